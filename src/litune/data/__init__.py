"""Data: from files or the hub to batches of the batch contract (``input_ids``, ``attention_mask``, ``labels``).

One job per module, in the order a row goes through them:

- :mod:`~litune.data.sources`: load raw rows (hub id, local files, folder, glob, stdlib), with bad-row diagnosis;
- :mod:`~litune.data.formats`: tokenize text, instruction or chat rows (labels -100 where no loss is taken);
- :mod:`~litune.data.packing`: lay tokens out in rows (concatenate and cut, bin-pack, or pad per sample);
- :mod:`~litune.data.pipeline`: the validated :class:`~litune.data.pipeline.DataSpec` and the build steps;
- :mod:`~litune.data.cache`: the fingerprinted tokenize-once cache;
- :mod:`~litune.data.stream`: the same pipeline on streams;
- :mod:`~litune.data.sampler`, :mod:`~litune.data.collate`: shards, order, resume point; padding into tensors;
- :mod:`~litune.data.text`: :class:`~litune.data.text.TextDataModule`, the LightningDataModule that wires them;
- :mod:`~litune.data.tokenizer`: ``load_tokenizer`` and the tokenizers litune builds (``TrainedBPE`` on a corpus,
  ``SymbolTokenizer``).

Encoder-decoder data reuses the same rooms (sources, ``formats.tokenize_pairs``, ``collate.Seq2SeqCollator``):
:mod:`~litune.data.seq2seq` has the DataModule of source/target pairs from files, :mod:`~litune.data.synthetic` the
generated reverse/sort/copy task (its tokenizer is :class:`litune.data.tokenizer.SymbolTokenizer`).

Nothing is imported here, so that importing one module (the tokenizer, say) does not import every DataModule.
"""
