"""The V2 block-swap memory manager for extraction.

Pure torch; never imports ComfyUI. It builds on ``extract`` (never the other way round). The V2
entry point is ``memory.manager.extract_lora_v2`` (not re-exported here, so that importing
``memory`` stays light). Policy: ``blocks`` and ``planner``; mechanics: ``streamer``,
``streams`` (CUDA stream/event order), ``buffers``, ``cache``, ``monitor``.
"""
