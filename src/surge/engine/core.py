"""EngineCore: the step loop over scheduler and model runner; survives bad requests and failed steps."""

from __future__ import annotations

import logging

from surge.config import EngineConfig
from surge.engine.inputs import check_request_fits
from surge.engine.messages import (
    EngineCoreFinish,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
)
from surge.engine.model_runner import ModelRunner, StepResult
from surge.engine.request import Request, RequestStatus
from surge.engine.scheduler import Scheduler, SchedulerOutput
from surge.models.loader import ModelFiles

logger = logging.getLogger(__name__)

_FINISH_STATUS = {"abort": RequestStatus.FINISHED_ABORTED, "stop": RequestStatus.FINISHED_STOPPED}


class EngineCore:
    """Schedules, executes and updates; one bad request or failed step never stops it."""

    def __init__(
        self, config: EngineConfig, files: ModelFiles, eos_token_ids: tuple[int, ...]
    ) -> None:
        self.runner = ModelRunner(config, files, eos_token_ids)
        self.limits = self.runner.limits
        self.scheduler = Scheduler(config, self.limits)
        self._errors: list[EngineCoreOutput] = []
        self.num_requests_received = 0  # the front end compares it with what it sent (routing)

    def add_request(self, msg: EngineCoreRequest) -> None:
        """Queue a request; one that can't be served ends at once with an error output."""
        self.num_requests_received += 1
        try:
            check_request_fits(msg.prompt_token_ids, msg.sampling_params.max_tokens, self.limits)
            self.scheduler.add_request(
                Request(
                    req_id=msg.req_id,
                    prompt_token_ids=list(msg.prompt_token_ids),
                    sampling_params=msg.sampling_params,
                    arrival_time=msg.arrival_time,
                    priority=msg.priority,
                    output_token_ids=list(msg.output_token_ids),
                )
            )
        except ValueError as e:  # InvalidRequestError included; also a duplicate request id
            self._errors.append(
                EngineCoreOutput(msg.req_id, [], finish_reason="error", error=str(e))
            )

    def finish_requests(self, msg: EngineCoreFinish) -> None:
        """Abort (client gone) or stop (stop string) sequences; their blocks are freed now."""
        self.scheduler.finish_requests(msg.req_ids, _FINISH_STATUS[msg.reason])

    def has_unfinished_requests(self) -> bool:
        return bool(self._errors) or self.scheduler.has_unfinished_requests()

    def step(self) -> EngineCoreOutputs:
        """Schedule -> execute -> update; return what changed."""
        sched = self.scheduler.schedule()
        result = self._execute(sched)
        updated = self.scheduler.update_from_output(sched, result.sampled_token_ids)
        return self._make_outputs(updated, result, sched.first_scheduled_req_ids)

    def _execute(self, sched: SchedulerOutput) -> StepResult:
        try:
            return self.runner.execute(sched)
        except Exception as e:  # noqa: BLE001 - a failed step fails its requests, never the core
            logger.exception(
                "step failed; finishing its %d requests with an error", len(sched.seqs)
            )
            req_ids = [s.request.req_id for s in sched.seqs]
            for req in self.scheduler.finish_requests(
                req_ids, RequestStatus.FINISHED_ERROR, error=str(e)
            ):
                self._errors.append(
                    EngineCoreOutput(
                        req.req_id, [], finish_reason="error", error=f"internal error: {e}"
                    )
                )
            return StepResult({}, {})

    def _make_outputs(
        self, updated: list[Request], result: StepResult, first_scheduled: list[str]
    ) -> EngineCoreOutputs:
        outputs, self._errors = self._errors, []
        for req in updated:
            new_ids = [req.output_token_ids[-1]] if req.req_id in result.sampled_token_ids else []
            logprob = result.logprobs.get(req.req_id)
            stop_reason = None
            if req.status == RequestStatus.FINISHED_STOPPED and new_ids:
                if new_ids[0] in req.sampling_params.stop_token_ids:
                    stop_reason = new_ids[0]
            outputs.append(
                EngineCoreOutput(
                    req_id=req.req_id,
                    new_token_ids=new_ids,
                    new_logprobs=[logprob] if logprob is not None else None,
                    finish_reason=req.finish_reason,
                    stop_reason=stop_reason,
                    error=req.error,
                    num_cached_tokens=max(req.num_cached_tokens, 0),
                )
            )
        return self.make_outputs(outputs, first_scheduled)

    def make_outputs(
        self,
        outputs: list[EngineCoreOutput] | None = None,
        first_scheduled: list[str] | None = None,
    ) -> EngineCoreOutputs:
        """Wrap outputs with the scheduler's load; with none, a stats-only message (e.g. after an abort)."""
        s = self.scheduler
        return EngineCoreOutputs(
            outputs=outputs or [],
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_cache_usage=s.kv_cache_usage,
            num_preemptions_total=s.num_preemptions_total,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            first_scheduled_req_ids=first_scheduled or [],
            num_requests_received=self.num_requests_received,
            num_waiting_tokens=s.num_waiting_tokens,
        )
