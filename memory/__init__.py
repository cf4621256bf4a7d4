"""The streamed (block-swap) extraction engine, run by the LoraExtractV2 node.

Pure torch; never imports ComfyUI. It builds on ``extract`` (never the other way round). The
entry point is ``memory.streamed_extract.extract_lora_streamed`` (not re-exported here, so that
importing ``memory`` stays light). Policy: ``modes``, ``options``, ``blocks`` and ``planner``;
mechanics: ``streamer``, ``streams`` (CUDA stream/event order), ``buffers``, ``cache``,
``monitor``; one run: ``streamed_extract``, ``batch_decompose``, ``layer_workers``, ``rolling``.
"""
