"""The model side: vision encoder -> connector -> causal LLM, assembled into one `VLM` module."""
