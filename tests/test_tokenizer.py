from zizhu.tokenizer import IncrementalDetokenizer, Tokenizer


def test_incremental_detokenizer_never_splits_characters(text_checkpoint):
    path, _ = text_checkpoint
    tok = Tokenizer(path)
    text = "DeepSeek 深度求索 ünïcode ✓ 1234"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt_ids=[])
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces)  # some tokens held a partial multi-byte character


def test_special_tokens_and_bos(text_checkpoint):
    path, _ = text_checkpoint
    tok = Tokenizer(path)
    assert tok.bos_token_id == tok.token_to_id("<｜begin▁of▁sentence｜>")
    assert tok.encode("hi")[0] == tok.bos_token_id
    assert tok.encode("hi", add_special_tokens=False)[0] != tok.bos_token_id
    ids = tok.encode("<｜User｜>hi<｜Assistant｜>", add_special_tokens=False)
    assert tok.token_to_id("<｜User｜>") in ids
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<｜User｜>hi<｜Assistant｜>"


def test_chat_template_renders_and_chat_generates(text_checkpoint):
    from zizhu import LLM, SamplingParams

    path, _ = text_checkpoint
    llm = LLM(path, dtype="float32", kv_cache_memory=1 << 20)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    rendered = llm.tokenizer.apply_chat_template(messages)
    assert rendered == "<｜begin▁of▁sentence｜>be brief<｜User｜>hello<｜Assistant｜>"
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert out.prompt_token_ids == llm.tokenizer.encode(rendered, add_special_tokens=False)
    assert len(out.outputs[0].token_ids) == 5
