"""One attention setting of an eval run, and the text a user gives for it.

    full                              full attention (an ADSA request with budget null: nothing is evicted)
    adsa[:POLICY[:BUDGET[:GRAN]]]     ADSA; a field left out (or empty) comes from --policy / --budget /
                                      --granularity, and from ADSA's defaults (random, 0.5, block) after them
    e.g. full adsa:topk_v:0.5 adsa:random:0.5 adsa:streaming:0.5 adsa:random:0.25:token adsa::300

Every setting of a run shares one engine (CFG is an engine setting): the setting travels with each request as
`extra_args["adsa"]`, so a run of four settings starts vLLM once.
"""

from __future__ import annotations

from dataclasses import dataclass

from adsa_vllm.cli_common import parse_budget
from adsa_vllm.config import ADSAConfig


@dataclass(frozen=True)
class Setting:
    """Full attention (budget None) or ADSA with a policy, budget (tokens or fraction) and granularity."""
    budget: int | float | None
    policy: str = "random"
    granularity: str = "block"

    @property
    def is_full(self) -> bool:
        return self.budget is None

    @property
    def label(self) -> str:
        """The setting's canonical text (table rows, and what parse_setting reads back)."""
        if self.is_full:
            return "full"
        return f"adsa:{self.policy}:{self.budget:g}" + ("" if self.granularity == "block" else f":{self.granularity}")

    @property
    def file_stem(self) -> str:
        """Name of the setting's sample files (no ':' in file names)."""
        return self.label.replace(":", "_")

    def request_adsa(self) -> dict:
        """The request's extra_args["adsa"]: every field explicit, so the engine's defaults never leak in."""
        if self.is_full:
            return {"budget": None}
        return {"budget": self.budget, "policy": self.policy, "granularity": self.granularity}

    def check(self, *, block_size: int, cls_token_num: int, grid_size: int) -> None:
        """ADSAConfigError naming the fix unless the engine would accept this setting for this model."""
        ADSAConfig.from_dict(self.request_adsa()).layout(block_size=block_size, cls_token_num=cls_token_num,
                                                         grid_size=grid_size)


def parse_setting(text: str, *, budget: str | None = None, policy: str | None = None,
                  granularity: str | None = None) -> Setting:
    """'full' or 'adsa[:POLICY[:BUDGET[:GRANULARITY]]]' -> Setting; missing fields from the keyword defaults (the
    CLI's --budget / --policy / --granularity), then ADSA's. ValueError naming the syntax."""
    base = ADSAConfig()
    parts = text.strip().split(":")
    if parts == ["full"]:
        return Setting(budget=None)
    if parts[0] != "adsa" or len(parts) > 4:
        raise ValueError(f"setting {text!r}: write 'full' or 'adsa[:POLICY[:BUDGET[:GRANULARITY]]]', e.g. "
                         "'adsa:topk_v:0.5' or 'adsa:random:0.25:token'")
    fields = parts[1:] + [""] * (4 - len(parts))
    pol = fields[0] or policy or base.policy
    bud_text = fields[1] or budget
    bud = base.budget if bud_text is None else parse_budget(bud_text)
    if bud is None:
        raise ValueError(f"setting {text!r}: an ADSA setting needs a budget; full attention is the setting 'full'")
    gran = fields[2] or granularity or base.granularity
    ADSAConfig(budget=bud, policy=pol, granularity=gran)   # unknown policy / granularity: the message names the valid
    return Setting(budget=bud, policy=pol, granularity=gran)


def parse_settings(texts: list[str] | None, *, budget: str | None = None, policy: str | None = None,
                   granularity: str | None = None) -> list[Setting]:
    """The run's settings, in the order given. Without texts: the one setting the flags describe (--budget none:
    full attention). Two texts naming the same setting are an error (they would share a sample file)."""
    if not texts:
        if budget is not None and parse_budget(budget) is None:
            return [Setting(budget=None)]
        texts = ["adsa"]
    settings = [parse_setting(t, budget=budget, policy=policy, granularity=granularity) for t in texts]
    labels = [s.label for s in settings]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ValueError(f"--settings names {', '.join(twice)} more than once")
    return settings


__all__ = ["Setting", "parse_setting", "parse_settings"]
