"""The data side: ``write`` (ImageFolder -> .beton), ``betons`` (the format and its checks, no ffcv),
``decoders``/``loaders``/``orders``/``jit`` (ffcv's pipelines), ``ahead`` (batch-ahead threads),
``source`` (the trainer's batches) and ``inspect`` (the command).

Modules that use ffcv import ``fastvit_reduce.data.ffcv_patch`` first; the others never import it.
"""
