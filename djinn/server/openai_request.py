"""The fields `/v1/completions` and `/v1/chat/completions` share, checked once for both: sampling, stop strings,
n, streaming, the neutral-only OpenAI fields, and Djinn's extension fields.

Extension fields (with the official client: `extra_body={...}`):
- `djinn_interventions`: declarative interventions as JSON, e.g. `{"type": "steer", "site":
  "blocks.3.hook_resid_post", "vector": [...], "scale": 4.0}` (types steer, scale, replace, ablate; tensors by
  value as nested lists);
- `djinn_captures`: site names (or patterns such as "blocks.*.hook_resid_post") to capture; each choice returns
  them as one safetensors file, base64-encoded, in its `djinn_captures` field (`{"safetensors_b64": ...}`,
  tensor "site@step" per site and step, as `out.captures[(site, step)]`); with stop strings the call then
  runs to its end (a cancelled call has no captures) and they cover every step it ran;
- `djinn_session`: the id of a session of the caller's key to run in (created with the Djinn client or
  `POST /api/sessions`): the prompt continues its history, and the session stays open afterwards.

A bad value is a 400 naming the field in OpenAI's error shape (`param` set).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..errors import DjinnError, InvalidRequest
from ..interventions import Capture
from ..validation import INT64_MAX, shown, text
from ..wire import decode_interventions, is_int, is_number
from .limits import Limits

MAX_N = 16
MAX_CHOICES = 64  # prompts x n of one request
EXTENSIONS = ("djinn_interventions", "djinn_captures", "djinn_session")
SHARED = ("model", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options", "logit_bias",
          "frequency_penalty", "presence_penalty", "user", *EXTENSIONS)


class BadField(InvalidRequest):
    """An invalid field value (400), with the field named in the error's `param`."""

    def __init__(self, name: str, message: str):
        super().__init__(f"'{name}': {message}")
        self.param = name


@dataclass
class Ask:
    """What a request asks of each of its choices."""

    model: Optional[str]
    max_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]
    stop: list[str]
    n: int
    stream: bool
    include_usage: bool
    interventions: list
    captures: list[str]
    session: Optional[str]
    top_logprobs: Optional[int] = None  # None: no log-probabilities; 0: the chosen tokens' only
    echo: bool = False
    extra: dict = field(default_factory=dict)  # the route's own fields (prompts, messages)

    @property
    def edits(self) -> list:
        """The interventions each choice's engine call gets: the edits and the captures."""
        return [*self.interventions, *(Capture(site) for site in self.captures)]


def check_text(name: str, v: str) -> None:
    """Refuses text that does not encode as UTF-8 (a lone surrogate), naming the field."""
    try:
        text(v, f"a {name} string")
    except InvalidRequest as e:
        raise BadField(name, e.message) from None


def reject_unknown(body: dict, allowed: tuple[str, ...], route: str) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise InvalidRequest(f"unknown field(s) {unknown}; {route} accepts {list(allowed)} (Djinn's extensions "
                             f"go in {list(EXTENSIONS)})")


def getter(body: dict) -> Callable[[str, Any], Any]:
    """body[name], or `default` where it is missing or null (as OpenAI treats null)."""
    def get(name: str, default: Any) -> Any:
        v = body.get(name)
        return default if v is None else v
    return get


def max_tokens(body: dict, names: tuple[str, ...], default: int, lim: Limits) -> int:
    """The first of `names` the body sets (OpenAI's chat has two spellings), checked against the limit."""
    given = [(k, body[k]) for k in names if body.get(k) is not None]
    if len({repr(v) for _, v in given}) > 1:
        raise BadField(given[1][0], f"disagrees with '{given[0][0]}'; set one of them")
    name, v = given[0] if given else (names[0], default)
    if not is_int(v) or v < 0:
        raise BadField(name, f"must be an integer >= 0, got {shown(v)}")
    if v > lim.max_new_tokens:
        raise BadField(name, f"{shown(v)} exceeds this server's limit of {lim.max_new_tokens}")
    return v


def _sampling(get: Callable[[str, Any], Any], body: dict) -> dict:
    temperature = get("temperature", 1.0)  # comparing refuses NaN, Inf and ints past any float too
    if not is_number(temperature) or not 0 <= temperature <= 2:
        raise BadField("temperature", f"must be a number in [0, 2], got {shown(temperature)}")
    top_p = get("top_p", 1.0)
    if not is_number(top_p) or not 0 < top_p <= 1:
        raise BadField("top_p", f"must be a number in (0, 1], got {shown(top_p)}")
    seed = body.get("seed")
    if seed is not None and (not is_int(seed) or not -INT64_MAX - 1 <= seed <= INT64_MAX):
        raise BadField("seed", f"must be a 64-bit integer, got {shown(seed)}")
    return dict(temperature=float(temperature), top_p=float(top_p), seed=seed)


def _stop(get: Callable[[str, Any], Any]) -> list[str]:
    stop = get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadField("stop", "must be a non-empty string or a list of at most 4 non-empty strings")
    for s in stop:
        check_text("stop", s)
    return stop


def _streaming(get: Callable[[str, Any], Any], body: dict) -> tuple[bool, bool]:
    stream = get("stream", False)
    if not isinstance(stream, bool):
        raise BadField("stream", "must be true or false")
    opts = get("stream_options", {})
    if not isinstance(opts, dict) or set(opts) - {"include_usage"} or \
            not isinstance(opts.get("include_usage", False), bool):
        raise BadField("stream_options", "accepts only {'include_usage': true|false}")
    if body.get("stream_options") is not None and not stream:
        raise BadField("stream_options", "is only valid with stream: true")
    return stream, bool(opts.get("include_usage", False))


def _neutral_only(get: Callable[[str, Any], Any], body: dict) -> None:
    """OpenAI fields Djinn takes only at the value that changes nothing."""
    for pen in ("frequency_penalty", "presence_penalty"):
        v = get(pen, 0)
        if not is_number(v) or v != 0:
            raise BadField(pen, "is not supported (only 0)")
    if get("logit_bias", {}) != {}:
        raise BadField("logit_bias", "is not supported")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadField("user", "must be a string")


def _interventions(get: Callable[[str, Any], Any], lim: Limits) -> list:
    try:
        return decode_interventions(get("djinn_interventions", []), "djinn_interventions", lim.max_list_items,
                                    allowed=("steer", "scale", "replace", "ablate"))
    except DjinnError as e:
        if type(e) is InvalidRequest:
            raise BadField("djinn_interventions", e.message) from None
        raise


def _captures(get: Callable[[str, Any], Any], lim: Limits) -> list[str]:
    sites = get("djinn_captures", [])
    if not isinstance(sites, list) or not all(isinstance(s, str) and s for s in sites):
        raise BadField("djinn_captures", "must be a list of hook site names, e.g. ['blocks.2.hook_resid_post']")
    if len(sites) > lim.max_list_items:
        raise BadField("djinn_captures", f"at most {lim.max_list_items} sites")
    for s in sites:
        check_text("djinn_captures", s)
    return sites


def _session(body: dict) -> Optional[str]:
    sid = body.get("djinn_session")
    if sid is not None and (not isinstance(sid, str) or not sid):
        raise BadField("djinn_session", f"must be a session id, got {shown(sid)}")
    return sid


def parse_shared(body: dict, lim: Limits, max_tokens_value: int, n_prompts: int = 1) -> Ask:
    """The shared fields of a body whose route checked its own (and refused unknown ones)."""
    get = getter(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadField("model", "must be a model name")
    n = get("n", 1)
    if not is_int(n) or not 1 <= n <= MAX_N:
        raise BadField("n", f"must be an integer in [1, {MAX_N}], got {shown(n)}")
    if n_prompts * n > MAX_CHOICES:
        raise BadField("n", f"prompts x n must be at most {MAX_CHOICES}")
    stop = _stop(get)
    stream, include_usage = _streaming(get, body)
    _neutral_only(get, body)
    ask = Ask(model, max_tokens_value, **_sampling(get, body), stop=stop, n=n, stream=stream,
              include_usage=include_usage, interventions=_interventions(get, lim), captures=_captures(get, lim),
              session=_session(body))
    if ask.session is not None and n_prompts * n > 1:
        raise BadField("djinn_session", "runs one choice (one prompt, n = 1): a session holds one history")
    return ask
