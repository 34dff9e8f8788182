"""Per-server limits on what one request or one key may ask for.

Checked by the server before anything reaches the engine; every breach is a `LimitExceeded` (429) or a
`FrameTooLarge` (413) with the limit in its message.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import LimitExceeded


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int = 64 << 20  # one WebSocket frame or one REST body
    max_prompt_tokens: int = 32768  # token ids in one prompt
    max_prompt_chars: int = 1 << 20  # characters in one text prompt
    max_new_tokens: int = 4096  # per generate call
    max_sessions_per_key: int = 256  # sessions one key holds at once (create, fork, restore)
    max_paused_per_key: int = 32  # streams with breakpoints (paused or able to pause) one key runs at once
    max_checkpoints_per_key: int = 64  # checkpoints one key keeps (they hold host memory shared by everyone)
    max_list_items: int = 65536  # entries in one list of steps, positions, stop tokens or interventions
    max_runs_per_key: int = 16  # runs of many prompts (client.run / run_iter) one key has going at once
    max_run_window: int = 1024  # prompts of one run fed and not yet answered

    def replace(self, **changes) -> "Limits":
        return dataclasses.replace(self, **changes)

    def check_max_new_tokens(self, n) -> None:
        if isinstance(n, int) and n > self.max_new_tokens:
            raise LimitExceeded(f"max_new_tokens {n} exceeds this server's limit of {self.max_new_tokens}")

    def check_sessions(self, n_held: int) -> None:
        if n_held >= self.max_sessions_per_key:
            raise LimitExceeded(f"this API key already holds {n_held} sessions, the limit is "
                                f"{self.max_sessions_per_key}: close some first (client.sessions() lists them, "
                                f"client.session_by_id(id).close() closes one; client.run closes its own)")

    def check_runs(self, n_running: int) -> None:
        if n_running >= self.max_runs_per_key:
            raise LimitExceeded(f"this API key already has {n_running} runs going, the limit is "
                                f"{self.max_runs_per_key}; let one finish first")

    def check_run_window(self, window) -> None:
        if not isinstance(window, int) or isinstance(window, bool) or not 1 <= window <= self.max_run_window:
            raise LimitExceeded(f"a run's window must be an integer in [1, {self.max_run_window}] on this server, "
                                f"got {window!r}")

    def check_checkpoints(self, n_held: int) -> None:
        if n_held >= self.max_checkpoints_per_key:
            raise LimitExceeded(f"this API key already keeps {n_held} checkpoints, the limit is "
                                f"{self.max_checkpoints_per_key}; delete some first")

    def check_paused(self, n_active: int) -> None:
        if n_active >= self.max_paused_per_key:
            raise LimitExceeded(f"this API key already has {n_active} streams with breakpoints or paused sessions, "
                                f"the limit is {self.max_paused_per_key}; resume or cancel some first")
