"""POST /v1/chat/completions: render the chat, generate, split reasoning and tool calls, answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from zizhu.errors import ConfigError, InvalidRequestError
from zizhu.outputs import CompletionOutput, PositionLogprobs
from zizhu.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    DeltaMessage,
    FunctionCall,
    FunctionCallDelta,
    TokenLogprob,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
    now,
    random_id,
)
from zizhu.server.reasoning import ReasoningParser, prompt_opens_thinking
from zizhu.server.serving import Generation, ResponseHeader, ServingContext, new_positions, sampling_params
from zizhu.server.tool_calls import ToolCall, ToolCallParser


class ChoiceState:
    """One choice's progress: what was already sent, and its reasoning/tool-call parsers."""

    def __init__(self, index: int, reasoning: ReasoningParser | None, tools: ToolCallParser | None, top_logprobs: int | None):
        self.index = index
        self.text_sent = 0
        self.tokens_seen = 0
        self.reasoning_parser = reasoning
        self.tool_parser = tools
        self.top_logprobs = top_logprobs
        self.finished = False
        self.reasoning = ""
        self.content = ""
        self.calls: list[ToolCall] = []
        self.logprobs: list[TokenLogprob] = []

    def update(self, output: CompletionOutput) -> tuple[DeltaMessage, list[TokenLogprob], str | None]:
        """Consume the cumulative `output`; return what is new and, once finished, the finish reason."""
        text = output.text[self.text_sent :]
        self.text_sent = len(output.text)
        positions = new_positions(output, self.tokens_seen)
        self.tokens_seen = len(output.token_ids)
        logprobs = []
        if self.top_logprobs is not None:
            logprobs = [token_logprob(t, p, self.top_logprobs) for t, p in positions if p is not None]
        self.logprobs.extend(logprobs)

        reasoning, content, calls = self._split(text)
        finish_reason = None
        if output.finished and not self.finished:
            self.finished = True
            more_reasoning, more_content, more_calls = self._flush()
            reasoning, content, calls = reasoning + more_reasoning, content + more_content, calls + more_calls
            has_calls = bool(self.calls or calls)
            finish_reason = "tool_calls" if has_calls and output.finish_reason != "abort" else output.finish_reason
        self.reasoning += reasoning
        self.content += content
        first_call = len(self.calls)
        self.calls.extend(calls)
        delta = DeltaMessage(
            reasoning_content=reasoning or None,
            content=content or None,
            tool_calls=[
                ToolCallDelta(
                    index=first_call + i, id=c.id, type="function", function=FunctionCallDelta(name=c.name, arguments=c.arguments)
                )
                for i, c in enumerate(calls)
            ]
            or None,
        )
        return delta, logprobs, finish_reason

    def _split(self, text: str) -> tuple[str, str, list[ToolCall]]:
        reasoning, content = "", text
        if self.reasoning_parser is not None:
            piece = self.reasoning_parser.feed(text)
            reasoning, content = piece.reasoning, piece.content
        return (reasoning, *self._parse_tools(content, final=False))

    def _flush(self) -> tuple[str, str, list[ToolCall]]:
        reasoning, content = "", ""
        if self.reasoning_parser is not None:
            piece = self.reasoning_parser.finish()
            reasoning, content = piece.reasoning, piece.content
        return (reasoning, *self._parse_tools(content, final=True))

    def _parse_tools(self, content: str, final: bool) -> tuple[str, list[ToolCall]]:
        if self.tool_parser is None:
            return content, []
        piece = self.tool_parser.feed(content)
        content, calls = piece.content, list(piece.calls)
        if final:
            content += self.tool_parser.finish().content
        return content, calls

    def message(self) -> ChatMessage:
        has_reasoning = self.reasoning_parser is not None and self.reasoning_parser.has_reasoning
        return ChatMessage(
            content=self.content if (self.content or not self.calls) else None,
            reasoning_content=self.reasoning if has_reasoning else None,
            tool_calls=[ToolCallOut(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in self.calls]
            or None,
        )


def token_logprob(token_id: int, position: PositionLogprobs, top_n: int | None) -> TokenLogprob:
    chosen = position[token_id]
    ranked = sorted(position.values(), key=lambda lp: lp.rank)[: top_n or 0]
    return TokenLogprob(
        token=chosen.decoded_token,
        logprob=chosen.logprob,
        bytes=list(chosen.decoded_token.encode("utf-8")),
        top_logprobs=[
            TopLogprob(token=lp.decoded_token, logprob=lp.logprob, bytes=list(lp.decoded_token.encode("utf-8"))) for lp in ranked
        ],
    )


class ChatHandler:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    def render(self, request: ChatCompletionRequest) -> str:
        messages = []
        for message in request.messages:
            item = message.model_dump(exclude_none=True)
            if isinstance(message.content, list):
                item["content"] = "".join(part.text for part in message.content)
            messages.append(item)
        tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
        kwargs = dict(request.chat_template_kwargs or {})
        if "enable_thinking" in kwargs:
            kwargs.setdefault("thinking", kwargs["enable_thinking"])
        try:
            return self.ctx.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, **kwargs)
        except InvalidRequestError:
            raise
        except ConfigError as exc:
            raise InvalidRequestError(f"{exc}; this model can still serve /v1/completions", param="messages") from exc
        except Exception as exc:  # Jinja templates signal bad conversations with arbitrary exceptions
            raise InvalidRequestError(f"the chat template could not render these messages: {exc}", param="messages") from exc

    def _check_unsupported(self, request: ChatCompletionRequest) -> None:
        if request.tool_choice is not None and request.tool_choice not in ("auto", "none"):
            raise InvalidRequestError(
                "only tool_choice 'auto' and 'none' are supported ('required' and named functions need constrained decoding)",
                param="tool_choice",
            )
        if request.response_format is not None and request.response_format.type != "text":
            raise InvalidRequestError("response_format json_object / json_schema is not supported", param="response_format")

    async def create(self, request: ChatCompletionRequest):
        """Returns a ChatCompletionResponse, or an async iterator of chunks when streaming."""
        model = self.ctx.served_name(request.model)
        self._check_unsupported(request)
        prompt = self.render(request)
        prompt_ids = self.ctx.tokenizer.encode(prompt, add_special_tokens=False)
        top_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        max_tokens = request.max_completion_tokens or request.max_tokens
        params = sampling_params(request, max_tokens, top_logprobs, self.ctx.generation_defaults)
        request_id = random_id("chatcmpl")
        generation = await self.ctx.start("chat", [(request_id, prompt_ids, params, prompt)])

        parse_tools = bool(request.tools and request.tool_choice != "none" and self.ctx.config.tool_call_format)
        opened_thinking = prompt_opens_thinking(prompt)
        choices = [
            ChoiceState(
                i,
                ReasoningParser(opened_thinking) if self.ctx.config.reasoning else None,
                ToolCallParser(self.ctx.config.tool_call_format) if parse_tools else None,
                top_logprobs,
            )
            for i in range(request.n)
        ]
        header = ResponseHeader(request_id, now(), model)
        if request.stream:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return self._stream(header, generation, choices, include_usage)
        return await self._complete(header, generation, choices)

    async def _complete(self, header: ResponseHeader, generation: Generation, choices: list[ChoiceState]) -> ChatCompletionResponse:
        async with aclosing(generation.outputs()) as outputs:
            async for _ in outputs:
                pass
        (final,) = generation.finals
        response_choices = []
        for o in final.outputs:
            state = choices[o.index]
            _, _, finish_reason = state.update(o)
            logprobs = ChatLogprobs(content=state.logprobs) if state.top_logprobs is not None else None
            response_choices.append(ChatChoice(index=o.index, message=state.message(), logprobs=logprobs, finish_reason=finish_reason))
        return ChatCompletionResponse(
            id=header.id,
            created=header.created,
            model=header.model,
            choices=sorted(response_choices, key=lambda c: c.index),
            usage=generation.usage(),
        )

    async def _stream(
        self, header: ResponseHeader, generation: Generation, choices: list[ChoiceState], include_usage: bool
    ) -> AsyncIterator[ChatCompletionChunk]:
        def chunk(choice_list: list[ChatChunkChoice], usage=None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=header.id, created=header.created, model=header.model, choices=choice_list, usage=usage)

        for state in choices:
            yield chunk([ChatChunkChoice(index=state.index, delta=DeltaMessage(role="assistant", content=""))])
        async with aclosing(generation.outputs()) as outputs:
            async for _, output in outputs:
                for o in output.outputs:
                    state = choices[o.index]
                    if state.finished:
                        continue
                    delta, logprobs, finish_reason = state.update(o)
                    logprob_field = ChatLogprobs(content=logprobs) if logprobs else None
                    if delta.content or delta.reasoning_content or delta.tool_calls or logprob_field:
                        yield chunk([ChatChunkChoice(index=o.index, delta=delta, logprobs=logprob_field)])
                    if finish_reason is not None:
                        yield chunk([ChatChunkChoice(index=o.index, delta=DeltaMessage(), finish_reason=finish_reason)])
        if include_usage:
            yield chunk([], generation.usage())
