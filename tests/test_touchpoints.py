"""The touchpoint ledger (patches/touchpoints.py, patches/README.md) is complete and current: every vLLM internal the
source scan finds (tests/touchpoint_scan.py) is a row for that file, every row is still used where it says, README
and code agree, and every guard passes on the installed vLLM and names its touchpoint when it fails.

Rule for what the scan finds but no touchpoint row holds: a finding in a patch module belongs to that patch's row of
the patch table (tests/test_patches.py checks those); a test may inspect what a patch changed (any name a patch
module touches); this file breaks internals on purpose to test the guards; NOT_VLLM lists the few findings that are
another library's or the plugin's own, with the reason.
"""

from __future__ import annotations

import re

import pytest
from touchpoint_scan import ROOT, Project

from adsa_vllm_patches import touchpoints
from adsa_vllm_patches.touchpoints import TOUCHPOINTS

README = ROOT / "patches" / "README.md"
LEDGER_FILES = {"patches/touchpoints.py", "tests/touchpoint_scan.py", "tests/test_touchpoints.py"}

# (file, name) -> why it is no vLLM touchpoint.
NOT_VLLM = {
    ("adsa_vllm/metrics.py", "_name"): "prometheus_client collectors' name (the scan cannot see the local's type)",
    ("tests/test_vllm_adsa.py", "evict"): "ADSAManager.evict is the plugin's own method (vLLM defines another evict)",
}


@pytest.fixture(scope="module")
def project():
    return Project()


def _uncovered(project: Project) -> list[str]:
    findings = project.findings()
    patch_names = {f.name for f in findings if f.path.startswith("patches/")}
    allowed = {(h, n) for tp in TOUCHPOINTS for h in tp.holders for n in tp.names}
    return [str(f) for f in findings
            if not f.path.startswith("patches/") and f.path not in LEDGER_FILES
            and (f.path, f.name) not in allowed and (f.path, f.name) not in NOT_VLLM
            and not (f.path.startswith("tests/") and f.name in patch_names)]


# ====================================================================== the scan against the ledger

def test_every_vllm_internal_the_scan_finds_is_in_the_ledger(project):
    missing = _uncovered(project)
    assert not missing, ("vLLM internals used outside the ledger; move the code into patches/ or add a Touchpoint "
                         "row (patches/touchpoints.py and patches/README.md) naming the file:\n  "
                         + "\n  ".join(missing))


def test_the_scan_catches_a_new_touchpoint():
    """The scan can fail: a new file with each kind of touchpoint, and a ledger holder using a name its row lacks."""
    new = ("from vllm import _custom_ops\n"
           "from vllm.v1.core.sched.scheduler import Scheduler\n\n"
           "def watch(llm, sched, runner):\n"
           "    sched._free_request_blocks(None)\n"             # private vLLM method called
           "    sched.adsa_note = 1\n"                          # attribute given to a vLLM object
           "    runner.execute_model = lambda *a: None\n"       # vLLM method rebound
           "    setattr(sched, 'waiting', [])\n\n"
           "class MyScheduler(Scheduler):\n"
           "    def _update_after_schedule(self, out):\n"       # private vLLM method overridden
           "        return super()._update_after_schedule(out)\n")
    held = (ROOT / "adsa_vllm/engine/scheduler.py").read_text() + "\n\ndef _x(sched):\n    sched._free_blocks(None)\n"
    project = Project(extra={"adsa_vllm/engine/new_watch.py": new, "adsa_vllm/engine/scheduler.py": held})
    missing = [m for m in _uncovered(project) if m.startswith(("adsa_vllm/engine/new_watch.py:",
                                                               "adsa_vllm/engine/scheduler.py:"))]
    for name in ("_custom_ops", "_free_request_blocks", "adsa_note", "execute_model", "waiting",
                 "_update_after_schedule"):
        assert any(m.startswith("adsa_vllm/engine/new_watch.py:") and m.endswith(f" {name}") for m in missing), \
            (name, missing)
    assert any(m.startswith("adsa_vllm/engine/scheduler.py:") and m.endswith(" _free_blocks") for m in missing)
    assert len(missing) == 8, missing


def test_project_code_is_not_a_finding():
    """The rule's other side: the project's own classes and argparse / torch settings are no findings."""
    source = ("import argparse\nimport torch\n\n"
              "class Box:\n    def __init__(self):\n        self._n = 0\n        self.size = 1\n\n"
              "def f(b: Box):\n    b._n += 1\n    b.size = 2\n"
              "    args = argparse.ArgumentParser().parse_args([])\n    args.top_k = 3\n"
              "    torch.backends.cuda.matmul.allow_tf32 = False\n")
    project = Project(dirs=(), extra={"adsa_vllm/box.py": source})
    assert project.findings() == []


# ====================================================================== the ledger is current

@pytest.mark.parametrize("tp", TOUCHPOINTS, ids=[tp.name for tp in TOUCHPOINTS])
def test_each_row_is_still_used_where_it_says(tp):
    texts = {h: (ROOT / h).read_text() for h in tp.holders if (ROOT / h).is_file()}
    assert set(texts) == set(tp.holders), f"{tp.name}: holder file(s) gone: {set(tp.holders) - set(texts)}"
    for holder, text in texts.items():
        assert any(re.search(rf"\b{re.escape(n)}\b", text) for n in tp.names), \
            f"{tp.name}: {holder} no longer uses {tp.names}: drop it from the row"
    for name in tp.names:
        assert any(re.search(rf"\b{re.escape(name)}\b", t) for t in texts.values()), f"{tp.name}: {name} unused"


@pytest.mark.parametrize("tp", [tp for tp in TOUCHPOINTS if tp.unseen], ids=lambda tp: tp.name)
def test_rows_the_scan_cannot_see_name_every_file_that_uses_them(tp):
    """Public names (no AST rule can tell them from the project's): every file that reads them is a holder."""
    users = set()
    for d in ("adsa_vllm", "benchmarks", "tests", "patches"):
        for path in (ROOT / d).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in LEDGER_FILES and any(re.search(rf"\.{re.escape(n)}\b", path.read_text())
                                               for n in tp.names):
                users.add(rel)
    assert users == set(tp.holders), f"{tp.name}: used in {sorted(users)}, ledger says {sorted(tp.holders)}"


def test_readme_lists_every_touchpoint_and_nothing_else():
    text = README.read_text()
    section = text[text.index("## Touchpoints"):]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([\w-]+)` \|.*$", section, re.M)}
    assert set(rows) == {tp.name for tp in TOUCHPOINTS}, "patches/README.md and patches/touchpoints.py disagree"
    for tp in TOUCHPOINTS:
        row = rows[tp.name]
        for part in [tp.target, tp.retired_by, "serving" if tp.serving else "tools"] + [f"`{h}`" for h in tp.holders]:
            assert part in row, f"README row {tp.name} lacks {part!r}"


def test_names_are_unique_and_rows_complete():
    assert len({tp.name for tp in TOUCHPOINTS}) == len(TOUCHPOINTS)
    for tp in TOUCHPOINTS:
        assert tp.target and tp.holders and tp.names and len(tp.why) > 40 and tp.retired_by and tp.guards, tp.name


# ====================================================================== guards

@pytest.mark.parametrize("tp", TOUCHPOINTS, ids=[tp.name for tp in TOUCHPOINTS])
def test_guard_passes_on_the_installed_vllm(tp):
    assert tp.problems() == []


def test_a_broken_internal_fails_with_one_message_naming_the_touchpoint(monkeypatch):
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler

    monkeypatch.delattr(Scheduler, "_preempt_request")
    monkeypatch.setattr(KVCacheManager, "allocate_slots", lambda self, req, n_tokens: None)
    with pytest.raises(RuntimeError) as err:
        touchpoints.check()
    message = str(err.value)
    assert "scheduler-preempt (adsa_vllm/engine/scheduler.py, tests/test_swap.py): " in message
    assert "Scheduler._preempt_request is gone" in message
    assert "kv-manager-allocate-slots (adsa_vllm/engine/scheduler.py): " in message
    assert "takes (req, n_tokens), not (request, num_new_tokens, ...)" in message
    assert "scheduler-watch" not in message                    # a tools row: not register()'s business
    assert "scheduler-watch" in str(pytest.raises(RuntimeError, touchpoints.check, serving_only=False).value)
    assert "patches/README.md" in message


def test_register_checks_the_touchpoints_before_changing_anything(monkeypatch):
    from vllm.v1.core.sched.scheduler import Scheduler

    import adsa_vllm_patches
    from adsa_vllm import plugin
    monkeypatch.delattr(Scheduler, "_free_request")
    monkeypatch.setattr(plugin, "_done", False)
    monkeypatch.setattr(adsa_vllm_patches, "apply_all",
                        lambda: pytest.fail("patches applied before the touchpoint check"))
    with pytest.raises(RuntimeError, match=r"scheduler-free \(adsa_vllm/engine/scheduler.py\)"):
        plugin.register()


def test_each_guard_kind_reports_what_changed(monkeypatch):
    import vllm
    import vllm.v1.outputs

    from adsa_vllm_patches.touchpoints import Fields, Has, OpenInstances, Reads, Series
    assert "is gone" in Has("vllm.v1.outputs:NoSuchThing").problem()
    assert "has no field(s) nope" in Fields("vllm.v1.outputs:ModelRunnerOutput", ("req_ids", "nope")).problem()
    assert "no longer uses nope" in Reads("vllm.v1.core.sched.scheduler:Scheduler.schedule", ("nope",)).problem()

    class Slotted:
        __slots__ = ("a",)
    monkeypatch.setattr(vllm.v1.outputs, "ModelRunnerOutput", Slotted)
    assert "no longer take new attributes" in OpenInstances("vllm.v1.outputs:ModelRunnerOutput").problem()
    assert OpenInstances("vllm.v1.outputs:EMPTY_MODEL_RUNNER_OUTPUT.__class__").problem() is None
    assert Series(("0.26",)).problem() is None
    monkeypatch.setattr(vllm, "__version__", "0.27.0")
    assert "0.26.x only, found 0.27.0" in Series(("0.26",)).problem()
