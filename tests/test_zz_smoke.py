def test_smoke(vlm, processor, tokenizer):
    print(vlm.encoder.num_tokens, vlm.image_token_id, len(vlm.tokenizer), vlm.llm.get_input_embeddings().num_embeddings)
    print(vlm.llm.config.tie_word_embeddings, vlm.llm.lm_head.weight is vlm.llm.model.embed_tokens.weight)
