"""`LLMEngine`: add requests, step the batch, get cumulative outputs back (offline or served).

One `step()` is one scheduler decision and one batched model forward: the scheduled prefill chunks
and decodes are flattened into a `ForwardBatch`, the runner writes their K/V into the paged cache
and returns logits for the sequences whose last token was computed, the sampler picks one token
each, and the detokenizer and stop rules decide who finishes. A request with `n > 1` is prefilled
once; when its prompt is done it forks into `n` sequences sharing the prompt's blocks. Finished
and aborted sequences give every block back at once. The engine is single-threaded: the server
drives `step()` from one thread and calls `add_request`/`abort` between steps.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Any, Protocol

import torch

from llmos_worker.engine.adapters import AdapterManager, AdapterNotFoundError
from llmos_worker.engine.block_manager import BlockManager
from llmos_worker.engine.config import EngineConfig
from llmos_worker.engine.detokenizer import Detokenizer, init_offsets
from llmos_worker.engine.guided import GuideCache
from llmos_worker.engine.kv_copy import copy_kv_blocks
from llmos_worker.engine.outputs import (
    CompletionOutput,
    EngineStats,
    RequestMetrics,
    RequestOutput,
    TokenLogprob,
)
from llmos_worker.engine.params import SamplingParams
from llmos_worker.engine.sampler import Sampler, SamplingRow
from llmos_worker.engine.scheduler import Scheduler, SchedulerOutput
from llmos_worker.engine.sequence import Request, Sequence
from llmos_worker.errors import InvalidRequestError
from llmos_worker.model.batch import ForwardBatch

if TYPE_CHECKING:
    from llmos_worker.model import LoadedModel

_GOLDEN = 0x9E3779B97F4A7C15  # why: spreads the seeds of a request's n completions apart


def completion_seed(seed: int, index: int) -> int:
    """Seed of completion `index` of a request seeded with `seed` (index 0 keeps `seed`)."""
    return (seed + index * _GOLDEN) % 2**64 if index else seed


class Runner(Protocol):
    """What the engine needs from a model runner (`llmos_worker.model.runner.ModelRunner`)."""

    def execute(self, batch: ForwardBatch) -> torch.Tensor: ...

    def execute_hidden(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and the final hidden states of `batch.pool_indices` (embeddings)."""
        ...


class _Pooled:
    """An embedding request's running sum of final hidden states over its prompt."""

    __slots__ = ("count", "total")

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0  # prompt positions summed so far (a recompute does not add them twice)


log = logging.getLogger(__name__)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.0f} MiB"


class LLMEngine:
    """Continuous-batching engine over one loaded model and one paged KV cache."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        runner: Runner | None = None,
        num_blocks: int | None = None,
    ):
        """`runner`/`num_blocks` replace the real model runner (tests); normally both are None."""
        self.config = config
        self.clock = clock
        self.model_name: str = loaded.name
        self.tokenizer = loaded.tokenizer
        self.vocab_size: int = loaded.config.vocab_size
        self.hidden_size: int = loaded.config.hidden_size  # the length of an embedding
        max_pos: int = loaded.config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > max_pos:
            raise InvalidRequestError(
                f"max_model_len {config.max_model_len} exceeds the model's context length "
                f"{max_pos}",
                param="max_model_len",
            )
        bs = config.block_size
        if runner is None:
            num_blocks = self._size_cache(loaded, config, max_pos)
            from llmos_worker.model.runner import ModelRunner

            runner = ModelRunner(
                loaded, block_size=bs, num_blocks=num_blocks, kv_dtype=config.kv_dtype()
            )
        elif num_blocks is None:
            raise ValueError("num_blocks is required with a custom runner")
        self.runner = runner
        self.num_blocks = num_blocks
        self.max_model_len: int = config.max_model_len or min(max_pos, num_blocks * bs)
        self.block_manager = BlockManager(
            num_blocks, bs, enable_prefix_caching=config.enable_prefix_caching
        )
        # LoRA adapters (`enable_lora`): slots in the model, the registry, the host-memory LRU
        self.adapters = AdapterManager.attach(loaded, config) if config.enable_lora else None
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            policy=config.scheduling_policy,
            slots=self.adapters,
        )
        self.sampler = Sampler(config.seed)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.eos_token_ids: frozenset[int] = frozenset(self.tokenizer.eos_token_ids)
        self.guides = GuideCache(getattr(self.tokenizer, "hf", None), self.vocab_size)
        self.requests: dict[str, Request] = {}
        # request id -> logprobs of its prompt tokens so far ([0] is None), for prompt_logprobs
        self.prompt_logprobs: dict[str, list[TokenLogprob | None]] = {}
        self._prompt_rows: list[tuple[str, int]] = []  # this step's (request id, position)
        self.pooled: dict[str, _Pooled] = {}  # embedding requests (`SamplingParams.embed`)
        self._pool_rows: list[tuple[str, int]] = []  # this step's (request id, rows pooled)
        self._pool_done: list[Sequence] = []  # embedding requests whose prompt ends this step
        self.prompt_tokens = 0  # whole prompts of requests whose prefill finished
        self.cached_prompt_tokens = 0  # of those, tokens found in the prefix cache
        self.computed_prompt_tokens = 0  # prompt tokens run through the model (recompute too)
        self.generation_tokens = 0
        self._ids = itertools.count()

    @classmethod
    def from_source(cls, source: str, config: EngineConfig) -> LLMEngine:
        """Load `source` (see `llmos_worker.model.load_model`) and build an engine over it."""
        from llmos_worker.model import load_model

        loaded = load_model(
            source, dtype=config.dtype, device=config.device, quantization=config.quantization
        )
        return cls(loaded, config)

    @staticmethod
    def _size_cache(loaded: LoadedModel, config: EngineConfig, max_pos: int) -> int:
        """Blocks for every seat at full length (`max_num_seqs` x `max_model_len`), no more,
        capped by `kv_cache_memory_fraction` of the memory available; an explicit
        `kv_cache_memory_bytes` replaces the cap. The choice and its reason are logged."""
        from llmos_worker.model.memory import available_memory_bytes
        from llmos_worker.model.runner import ModelRunner

        per_block = ModelRunner.bytes_per_block(loaded.config, config.block_size, config.kv_dtype())
        max_len = config.max_model_len or max_pos
        useful = config.max_num_seqs * -(-max_len // config.block_size) + 1
        if config.kv_cache_memory_bytes is not None:
            budget = config.kv_cache_memory_bytes
            cap = f"kv_cache_memory_bytes {_mib(budget)}"
        else:
            available = available_memory_bytes(config.device)
            budget = int(available * config.kv_cache_memory_fraction)
            cap = (
                f"kv_cache_memory_fraction {config.kv_cache_memory_fraction:g} of "
                f"{_mib(available)} available"
            )
        if budget // per_block < 1:
            raise InvalidRequestError(
                f"the KV cache budget of {budget} bytes holds no block of {per_block} bytes",
                param="kv_cache_memory_bytes",
            )
        num_blocks = int(min(budget // per_block, useful))
        why = (
            f"all of max_num_seqs {config.max_num_seqs} x max_model_len {max_len}, within {cap}"
            if num_blocks == useful
            else f"max_num_seqs {config.max_num_seqs} x max_model_len {max_len} would take "
            f"{_mib(useful * per_block)}; capped by {cap}"
        )
        log.info(
            "KV cache: %d blocks of %d tokens (%s, %s): %s",
            num_blocks,
            config.block_size,
            _mib(num_blocks * per_block),
            config.kv_dtype(),
            why,
        )
        return num_blocks

    # ---------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str = "",
        arrival_time: float | None = None,
        lora_name: str | None = None,
    ) -> None:
        """Queue a request, run with the LoRA adapter registered as `lora_name` (None:
        `params.lora_name`, and None there too: the base model); refuses (InvalidRequestError)
        what could never be served, and an unknown adapter (`AdapterNotFoundError`)."""
        if request_id in self.requests:
            raise InvalidRequestError(
                f"request id {request_id!r} is already in use",
                param="request_id",
                code="duplicate_request_id",
            )
        if params.n > self.config.max_num_seqs:
            raise InvalidRequestError(
                f"n ({params.n}) exceeds max_num_seqs ({self.config.max_num_seqs})", param="n"
            )
        lora = None
        lora_name = params.lora_name if lora_name is None else lora_name
        if lora_name is not None:
            if self.adapters is None:
                raise AdapterNotFoundError(lora_name)
            lora = self.adapters.resolve(lora_name)
        ids = (
            self.tokenizer.encode(prompt, add_special_tokens=True)
            if isinstance(prompt, str)
            else list(prompt)
        )
        if not ids:
            raise InvalidRequestError("prompt is empty", param="prompt", code="empty_prompt")
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise InvalidRequestError(
                f"prompt has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}",
                param="prompt",
                code="invalid_token_id",
            )
        plen, limit = len(ids), self.max_model_len
        if params.embed:
            self._add_embedding(request_id, ids, params, priority, cache_salt, arrival_time, lora)
            return
        if plen >= limit:
            raise InvalidRequestError(
                f"prompt has {plen} tokens but max_model_len is {limit}: no room for any "
                "output token",
                param="prompt",
                code="context_length_exceeded",
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - plen
        if plen + max_tokens > limit:
            raise InvalidRequestError(
                f"prompt ({plen} tokens) + max_tokens ({max_tokens}) = {plen + max_tokens} "
                f"exceeds max_model_len ({limit})",
                param="max_tokens",
                code="context_length_exceeded",
            )
        # the last sampled token never needs a KV slot
        need = self.block_manager.blocks_for(plen + max_tokens - 1)
        if need > self.num_blocks:
            raise InvalidRequestError(
                f"prompt ({plen} tokens) + max_tokens ({max_tokens}) needs {need} KV blocks of "
                f"{self.config.block_size} tokens but the cache has {self.num_blocks}; it could "
                "never run",
                param="max_tokens"
                if plen <= self.num_blocks * self.config.block_size
                else "prompt",
                code="kv_cache_too_small",
            )
        if params.prompt_logprobs is not None:
            # why: a prefix found in the cache is not computed, so its logprobs would be missing;
            # a salt of its own keeps this request from reusing (or lending) cached blocks
            cache_salt = f"{cache_salt}\x00prompt-logprobs:{request_id}"
            self.prompt_logprobs[request_id] = [None]
        now = self.clock()
        arrival = now if arrival_time is None else arrival_time
        seq = Sequence(
            request_id=request_id,
            index=0,
            token_ids=ids,
            num_prompt_tokens=plen,
            params=params,
            max_tokens=max_tokens,
            priority=priority,
            arrival_time=arrival,
            cache_salt=cache_salt,
            lora=lora,
            num_seats=params.n,
        )
        seq.generator = self._generator(params, 0)
        if params.guide is not None:
            seq.matcher = self.guides.matcher(params.guide)
        if params.logprobs is not None:
            seq.logprobs = []
        init_offsets(seq)
        request = Request(
            request_id, list(ids), params, RequestMetrics(arrival_time=arrival), seqs=[seq]
        )
        self.requests[request_id] = request
        self.scheduler.add(seq)

    def _add_embedding(
        self,
        request_id: str,
        ids: list[int],
        params: SamplingParams,
        priority: int,
        cache_salt: str,
        arrival_time: float | None,
        lora: Any,
    ) -> None:
        """Queue a prompt to be run for its embedding only: it takes KV blocks for its prompt
        while it prefills (in batches with generation), and nothing is sampled."""
        plen, limit = len(ids), self.max_model_len
        if plen > limit:
            raise InvalidRequestError(
                f"input has {plen} tokens but max_model_len is {limit}",
                param="input",
                code="context_length_exceeded",
            )
        if self.block_manager.blocks_for(plen) > self.num_blocks:
            raise InvalidRequestError(
                f"input ({plen} tokens) needs more KV blocks than the cache has "
                f"({self.num_blocks} of {self.config.block_size} tokens)",
                param="input",
                code="kv_cache_too_small",
            )
        now = self.clock()
        arrival = now if arrival_time is None else arrival_time
        seq = Sequence(
            request_id=request_id,
            index=0,
            token_ids=ids,
            num_prompt_tokens=plen,
            params=params,
            max_tokens=1,
            priority=priority,
            arrival_time=arrival,
            # why: a prefix found in the cache is not computed, so its hidden states would be
            # missing from the mean; a salt of its own keeps every position computed
            cache_salt=f"{cache_salt}\x00embed:{request_id}",
            lora=lora,
            num_seats=1,
        )
        request = Request(
            request_id, list(ids), params, RequestMetrics(arrival_time=arrival), seqs=[seq]
        )
        self.requests[request_id] = request
        self.pooled[request_id] = _Pooled()
        self.scheduler.add(seq)

    @staticmethod
    def _generator(params: SamplingParams, index: int) -> torch.Generator | None:
        if params.seed is None:
            return None
        return torch.Generator().manual_seed(completion_seed(params.seed, index))

    def abort(self, request_id: str) -> None:
        """Forget a request and free its blocks; idempotent, and no output follows."""
        request = self.requests.pop(request_id, None)
        self.prompt_logprobs.pop(request_id, None)
        self.pooled.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---------------------------------------------------------------- the step
    def step(self) -> list[RequestOutput]:
        """Run one scheduler iteration and one forward; outputs of requests that progressed."""
        if not self.scheduler.has_unfinished():
            return []
        out = self.scheduler.schedule()
        now = self.clock()
        for seq in out.preempted:
            self.requests[seq.request_id].metrics.num_preemptions += 1
        if not out.scheduled:
            return []
        if out.copies:
            copy_kv_blocks(self.runner, out.copies)
        batch, sample_seqs = self._build_batch(out, now)
        if batch.pool_indices is None:
            logits = self.runner.execute(batch)  # (len(sample_seqs) + prompt rows, V)
        else:
            logits, hidden = self.runner.execute_hidden(batch)
            self._record_pooled(hidden)
        if self._prompt_rows:
            logits = self._record_prompt_logprobs(logits, len(sample_seqs))
        self.scheduler.update_after_step(out)
        embedded = self._finish_pooled(self.clock())

        rows: list[SamplingRow] = []
        targets: list[Sequence] = []
        row_of: list[int] = []
        for i, seq in enumerate(sample_seqs):
            request = self.requests[seq.request_id]
            group = [seq]
            if not request.forked and request.params.n > 1:
                group += self._fork(request, seq)
            for s in group:
                rows.append(self._sampling_row(s))
                targets.append(s)
                row_of.append(i)
        if len(row_of) != len(sample_seqs):
            logits = logits[torch.tensor(row_of)]
        sampled = self.sampler.sample(logits, rows) if rows else []

        now = self.clock()
        touched: dict[str, Request] = {}
        for seq, tok in zip(targets, sampled, strict=True):
            request = self.requests[seq.request_id]
            self._append(request, seq, tok.token_id, tok.logprob, now)
            touched[request.request_id] = request
        outputs = [self._output(r) for r in touched.values()] + embedded
        for r in touched.values():
            if r.finished:
                r.metrics.finished_time = now
                del self.requests[r.request_id]
                self.prompt_logprobs.pop(r.request_id, None)
        return outputs

    def _build_batch(self, out: SchedulerOutput, now: float) -> tuple[ForwardBatch, list[Sequence]]:
        bs = self.config.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        context_lens: list[int] = []
        tables: list[list[int]] = []
        logits_indices: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_rows: list[tuple[str, int]] = []
        prompt_indices: list[int] = []
        pool_indices: list[int] = []
        pool_rows: list[tuple[str, int]] = []
        pool_done: list[Sequence] = []
        lora_slots: list[int] = []
        # why sorted: rows of one LoRA slot adjacent, one low-rank product per adapter present
        for item in sorted(out.scheduled, key=lambda it: it.seq.lora_slot):
            seq, n = item.seq, item.num_new_tokens
            c = seq.num_computed_tokens
            metrics = self.requests[seq.request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
                metrics.num_cached_prompt_tokens = seq.num_cached_tokens
            self.computed_prompt_tokens += max(0, min(c + n, seq.num_prompt_tokens) - c)
            input_ids += seq.token_ids[c : c + n]
            positions += range(c, c + n)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(c, c + n)]
            starts.append(starts[-1] + n)
            lora_slots += [seq.lora_slot] * n
            context_lens.append(c + n)
            tables.append(table)
            pooled = self.pooled.get(seq.request_id)
            if pooled is not None:
                # every prompt position not yet summed (a recompute does not add them twice)
                first = max(c, pooled.count)
                pool_indices += range(starts[-2] + first - c, starts[-1])
                pool_rows.append((seq.request_id, max(0, c + n - first)))
                if c + n == seq.num_tokens:
                    pool_done.append(seq)
                continue
            if c + n == seq.num_tokens:
                logits_indices.append(starts[-1] - 1)
                sample_seqs.append(seq)
            done = self.prompt_logprobs.get(seq.request_id)
            if done is not None and seq.index == 0:
                # positions whose logits score the next prompt token, not yet scored (a
                # recompute after preemption does not score them twice)
                for p in range(max(c, len(done) - 1), min(c + n, seq.num_prompt_tokens - 1)):
                    prompt_rows.append((seq.request_id, p))
                    prompt_indices.append(starts[-2] + p - c)
        self._prompt_rows = prompt_rows
        self._pool_rows, self._pool_done = pool_rows, pool_done
        logits_indices += prompt_indices  # after the sampled rows, which keep their order
        width = max(len(t) for t in tables)
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            query_start_loc=torch.tensor(starts, dtype=torch.long),
            context_lens=torch.tensor(context_lens, dtype=torch.long),
            block_tables=torch.tensor(
                [t + [0] * (width - len(t)) for t in tables], dtype=torch.long
            ),
            logits_indices=torch.tensor(logits_indices, dtype=torch.long),
            lora_slots=torch.tensor(lora_slots, dtype=torch.long) if lora_slots[-1] >= 0 else None,
            pool_indices=torch.tensor(pool_indices, dtype=torch.long) if pool_rows else None,
        )
        return batch, sample_seqs

    def _record_pooled(self, hidden: torch.Tensor | None) -> None:
        """Add this step's final hidden states to each embedding request's sum."""
        at = 0
        for rid, n in self._pool_rows:
            pooled = self.pooled[rid]
            if n and hidden is not None:
                part = hidden[at : at + n].sum(dim=0, dtype=torch.float64)
                pooled.total = part if pooled.total is None else pooled.total + part
                pooled.count += n
            at += n
        self._pool_rows = []

    def _finish_pooled(self, now: float) -> list[RequestOutput]:
        """Outputs of the embedding requests whose whole prompt has been run: the mean of the
        final hidden states over the prompt, L2-normalized."""
        done: list[RequestOutput] = []
        for seq in self._pool_done:
            request = self.requests.pop(seq.request_id)
            pooled = self.pooled.pop(seq.request_id)
            self.scheduler.finish(seq)
            seq.finish_reason = "stop"
            assert pooled.total is not None and pooled.count == seq.num_prompt_tokens
            mean = pooled.total / pooled.count
            vector = torch.nn.functional.normalize(mean, dim=0).float()
            metrics = request.metrics
            metrics.first_token_time = metrics.last_token_time = metrics.finished_time = now
            self.prompt_tokens += seq.num_prompt_tokens
            done.append(
                RequestOutput(
                    request_id=request.request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    outputs=[],
                    finished=True,
                    metrics=metrics,
                    embedding=vector.tolist(),
                )
            )
        self._pool_done = []
        return done

    def _record_prompt_logprobs(self, logits: torch.Tensor, num_sampled: int) -> torch.Tensor:
        """Score this step's prompt rows (the logits past `num_sampled`); the sampled rows."""
        lp = torch.log_softmax(logits[num_sampled:].float(), dim=-1)
        for (rid, p), row in zip(self._prompt_rows, lp, strict=True):
            request = self.requests[rid]
            k = request.params.prompt_logprobs or 0
            token = request.prompt_token_ids[p + 1]
            top: dict[int, float] = {}
            if k:
                vals, ids = torch.topk(row, k)
                top = dict(zip(ids.tolist(), vals.tolist(), strict=True))
            self.prompt_logprobs[rid].append(TokenLogprob(token, float(row[token]), top))
        self._prompt_rows = []
        return logits[:num_sampled]

    def _fork(self, request: Request, parent: Sequence) -> list[Sequence]:
        """Split a prefilled request into its n sequences, sharing the prompt's blocks."""
        request.forked = True
        parent.num_seats = 1
        children = []
        for index in range(1, request.params.n):
            child = parent.fork(index)
            child.generator = self._generator(request.params, index)
            self.block_manager.fork(parent, child)
            self.scheduler.add_running(child)
            children.append(child)
        request.seqs += children
        return children

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        p = seq.params
        banned: list[int] = []
        if seq.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids)
            if not p.ignore_eos:
                banned += self.eos_token_ids
        return SamplingRow(
            params=p,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            output_token_ids=seq.output_token_ids,
            generator=seq.generator,
            banned_token_ids=banned,
            matcher=seq.matcher,
        )

    def _append(
        self, request: Request, seq: Sequence, token: int, logprob: Any, now: float
    ) -> None:
        seq.token_ids.append(token)
        self.generation_tokens += 1
        if logprob is not None and seq.logprobs is not None:
            seq.logprobs.append(logprob)
            seq.cumulative_logprob += logprob.logprob
        metrics = request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
            # why: as vLLM's prompt_tokens_total, a prompt counts whole once its prefill is done,
            # cache hits included (they are counted apart as well)
            self.prompt_tokens += len(request.prompt_token_ids)
            self.cached_prompt_tokens += metrics.num_cached_prompt_tokens
        metrics.last_token_time = now
        p = seq.params
        is_eos = not p.ignore_eos and token in self.eos_token_ids
        grammar_done = False
        if seq.matcher is not None and not is_eos:
            # why: a refused token means the grammar failed (it cannot happen for a token the
            # mask allowed); the sequence ends rather than produce what the grammar forbids
            refused = not seq.matcher.consume_token(token)
            grammar_done = refused or seq.matcher.is_stopped()
        if token in p.stop_token_ids or is_eos:
            # the stop token stays in token_ids but not in the text
            self.detokenizer.decode_new(seq, upto=seq.num_tokens - 1)
            seq.finish_reason = "stop"
            seq.stop_reason = token if token in p.stop_token_ids else None
        else:
            new_chars = self.detokenizer.decode_new(seq)
            if self.detokenizer.check_stop_strings(seq, new_chars) or grammar_done:
                seq.finish_reason = "stop"
            elif seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)

    def _output(self, request: Request) -> RequestOutput:
        outs = []
        for seq in sorted(request.seqs, key=lambda s: s.index):
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=self.detokenizer.visible_text(seq),
                    token_ids=seq.output_token_ids,
                    cumulative_logprob=None if seq.logprobs is None else seq.cumulative_logprob,
                    logprobs=None if seq.logprobs is None else list(seq.logprobs),
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            outputs=outs,
            finished=request.finished,
            metrics=request.metrics,
            prompt_logprobs=self.prompt_logprobs.get(request.request_id),
        )

    # ---------------------------------------------------------------- introspection
    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_swapped=0,
            kv_cache_usage=bm.usage(),
            num_total_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens,
            computed_prompt_tokens=self.computed_prompt_tokens,
            generation_tokens=self.generation_tokens,
        )

    # ---------------------------------------------------------------- offline use
    def generate(
        self, prompts: Seq[str | list[int]], params: SamplingParams | Iterable[SamplingParams]
    ) -> list[RequestOutput]:
        """Run `prompts` to completion as one batch; outputs in prompt order."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise InvalidRequestError("one SamplingParams per prompt is required", param="params")
        ids = [f"generate-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt, p in zip(ids, prompts, plist, strict=True):
                self.add_request(rid, prompt, p)
            final: dict[str, RequestOutput] = {}
            while len(final) < len(ids) and self.has_unfinished():
                for o in self.step():
                    if o.finished:
                        final[o.request_id] = o
        finally:
            for rid in ids:
                self.abort(rid)
        return [final[rid] for rid in ids]
