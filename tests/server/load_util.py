"""Helpers shared by the load tests (fake engine and real engine)."""

from __future__ import annotations

import asyncio
import random

import openai


def make_requests(n: int, seed: int = 0, max_prompt_words: int = 40, max_tokens: int = 24) -> list[dict]:
    """``n`` greedy requests of mixed prompt lengths and output lengths; every other one streams,
    every third one is a chat request."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "fox", "über", "naïve", "42", "the", "end"]
    reqs = []
    for i in range(n):
        text = f"req {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(0, max_prompt_words)))
        reqs.append({"chat": i % 3 == 0, "stream": i % 2 == 0, "text": text,
                     "max_tokens": rng.randint(1, max_tokens)})
    return reqs


async def run_one(client: openai.AsyncOpenAI, model: str, req: dict) -> tuple[str, int]:
    """Returns (text, completion_tokens)."""
    common = dict(model=model, max_tokens=req["max_tokens"], temperature=0)
    if req["stream"]:
        common.update(stream=True, stream_options={"include_usage": True})
    if req["chat"]:
        r = await client.chat.completions.create(messages=[{"role": "user", "content": req["text"]}], **common)
    else:
        r = await client.completions.create(prompt=req["text"], **common)
    if not req["stream"]:
        c = r.choices[0]
        return (c.message.content if req["chat"] else c.text), r.usage.completion_tokens
    parts, usage = [], None
    async for chunk in r:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append((c.delta.content or "") if req["chat"] else c.text)
    return "".join(parts), usage.completion_tokens


def run_load(base_url: str, model: str, reqs: list[dict], concurrent: bool, timeout: float = 120.0):
    async def main():
        client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=timeout)
        try:
            if concurrent:
                return await asyncio.wait_for(asyncio.gather(*(run_one(client, model, r) for r in reqs)), timeout)
            return [await run_one(client, model, r) for r in reqs]
        finally:
            await client.close()

    return asyncio.run(main())
