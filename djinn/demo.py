"""`djinn demo`: the engine on its embedded default model, end to end, in the terminal.

Generates a continuation, pauses it mid-forward at a middle layer, shows the activation, resumes once
unchanged (checking the tokens equal an uninterrupted run) and once steered, and shows both side by side.
"""
from __future__ import annotations

import argparse
from typing import Optional

import torch

import djinn

PROMPT = "The function returns"
STEER_TOWARD = "The file is opened for reading and writing; the file object reads bytes from the file on disk."
STEER_AWAY = "The number is an integer; the float value is rounded and the arithmetic result is a number."


def steering_vector(session_factory, site: str) -> torch.Tensor:
    """Difference of mean activations at `site` between two contrasting texts."""
    def mean_at(text: str) -> torch.Tensor:
        out = session_factory().generate(text, max_new_tokens=0, interventions=[djinn.Capture(site, steps=[0])])
        return out.captures[(site, 0)].float().mean(0)
    return mean_at(STEER_TOWARD) - mean_at(STEER_AWAY)


def main(args: Optional[argparse.Namespace] = None) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    model = getattr(args, "model", None)
    n_new = getattr(args, "max_new_tokens", 40)
    with console.status("loading the model"):
        client = djinn.connect(model=model, dtype=getattr(args, "dtype", "float32"),
                               device=getattr(args, "device", "cpu"))
    info = client.models()[0]
    console.print(f"[bold]Djinn demo[/] on [cyan]{info.name}[/]: {info.family}, {info.n_layers} layers, "
                  f"d_model {info.d_model}, {info.dtype} on {info.device}")
    layer = info.n_layers // 2
    site = f"blocks.{layer}.hook_resid_post"

    plain = client.session().generate(PROMPT, max_new_tokens=n_new)
    console.print(f"\n[bold]1. Uninterrupted[/] greedy continuation of {PROMPT!r}:\n   {PROMPT}[green]{plain.text}[/]")

    console.print(f"\n[bold]2. Pause[/] at [cyan]{site}[/] on the prefill (step 0) and decode step 5")
    paused_run: list[int] = []
    for ev in client.session().stream(PROMPT, max_new_tokens=n_new, breakpoints=[djinn.Breakpoint(site, steps=[0, 5])]):
        if isinstance(ev, djinn.Paused):
            a = ev.activation.float()
            console.print(f"   paused at {ev.site}, step {ev.step}, positions {ev.positions[0]}..{ev.positions[-1]}: "
                          f"activation {list(ev.activation.shape)} {ev.activation.dtype}, mean {a.mean():+.3f}, "
                          f"std {a.std(unbiased=False):.3f}, |max| {a.abs().max():.3f}")
            ev.resume()  # unchanged
        elif isinstance(ev, djinn.Token):
            paused_run.append(ev.token_id)
    same = paused_run == plain.token_ids
    console.print(f"   resumed unchanged: tokens {'[green]identical[/]' if same else '[red]DIFFERENT[/]'} "
                  f"to the uninterrupted run ({len(paused_run)} tokens)")

    vector = steering_vector(client.session, site)
    scale = getattr(args, "scale", 1.0)
    console.print(f"\n[bold]3. Steer[/]: pause at the same site and add {scale} x a 'files' direction "
                  f"(|v| = {vector.norm():.2f}) before resuming, at every step")
    steered_tokens: list[int] = []
    steps = range(0, n_new + 1)
    for ev in client.session().stream(PROMPT, max_new_tokens=n_new, breakpoints=[djinn.Breakpoint(site, steps=steps)]):
        if isinstance(ev, djinn.Paused):
            ev.resume(ev.activation + scale * vector.to(ev.activation.dtype))
        elif isinstance(ev, djinn.Token):
            steered_tokens.append(ev.token_id)
    steered = client.detokenize(steered_tokens)
    declarative = client.session().generate(PROMPT, max_new_tokens=n_new,
                                            interventions=[djinn.Steer(site, vector, scale=scale)])

    table = Table(title=f"{PROMPT!r}, continued", show_lines=True)
    table.add_column("unchanged resume", style="green", ratio=1)
    table.add_column(f"steered at {site}", style="magenta", ratio=1)
    table.add_row(client.detokenize(paused_run), steered)
    console.print(table)
    agree = declarative.token_ids == steered_tokens
    console.print(f"   the same edit as a declarative djinn.Steer (no round trips): "
                  f"{'[green]same tokens[/]' if agree else '[yellow]different tokens[/]'}")
    client.close()
    return 0 if same else 1
