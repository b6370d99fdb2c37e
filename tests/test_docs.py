"""The guide stays true: README.md and docs/*.md are held to the code they describe.

- every `epserve ...` command line (in shell code blocks and in inline code) parses with the real CLI
  parser (cli._parser(); `epserve bench X` also through bench/args.py's check of its flags), and a bare
  command name (`epserve report`) is one the CLI has;
- every key of config.py's dataclasses is a row of docs/config.md with its default, every row there is
  a key, and every key the YAML files in configs/ and examples/ set is documented;
- every request field of serve/openai_models.py's models (and every field it refuses by name) is a row
  of docs/api.md's field table, every row is one, and no row says "ignored";
- every repository path the docs name (examples/, configs/, benchmarks/ ...) exists, and every relative
  markdown link resolves, anchors included;
- every metric /metrics exports is in docs/operations.md.
Each check is a function of the text, and the `*_would_be_caught` tests plant a defect in it (five
checks and their five planted defects: a little over 300 lines, one noun, the guide's truth).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from epserve import cli
from epserve.bench import args as bench_args
from epserve.config import Config
from epserve.errors import Unavailable
from epserve.serve import openai_models as om
from epserve.serve.metrics import ServeMetrics

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("", "bash", "sh", "shell", "console")
FOLDERS = "examples|configs|scripts|benchmarks|tests|docs|serve|actors|pipelines|model|kernels|fleet|placement|bench"
REPO_PATH = re.compile(rf"(?<![\w./:~$-])((?:{FOLDERS})/[\w./*-]*[\w*])")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _text(path: Path) -> str:
    return path.read_text()


# ---- commands -----------------------------------------------------------------------------------
def shell_snippets(md: str) -> list[str]:
    """Shell text of the document: each line of shell code blocks (backslash continuations joined) and
    every inline code span."""
    out = []
    for lang, body in FENCE.findall(md):
        if lang in SHELL:
            out += [ln for ln in body.replace("\\\n", " ").splitlines() if ln.strip()]
    prose = FENCE.sub("", md)
    return out + SPAN.findall(prose)


def epserve_commands(snippet: str) -> list[list[str]]:
    """argv (after `epserve`) of each command in a shell snippet that runs epserve: `epserve ...`,
    `.venv/bin/epserve ...`, `python -m epserve ...`, after any VAR=value prefix."""
    try:
        lex = shlex.shlex(snippet, posix=True, punctuation_chars=True)
        lex.whitespace_split, lex.commenters = True, "#"
        tokens = list(lex)
    except ValueError:
        return []
    cmds, seg = [], []
    for tok in tokens + [";"]:
        if tok and set(tok) <= set("&|;<>()"):
            while seg and re.fullmatch(r"[A-Za-z_]\w*=\S*", seg[0]):
                seg = seg[1:]
            if seg and Path(seg[0]).name == "epserve":
                cmds.append(seg[1:])
            elif len(seg) >= 3 and Path(seg[0]).name.startswith("python") and seg[1:3] == ["-m", "epserve"]:
                cmds.append(seg[3:])
            seg = []
        else:
            seg.append(tok)
    return cmds


def command_problem(argv: list[str]) -> str | None:
    """Why `epserve argv` is not a command line the CLI takes (None: it is)."""
    top = cli._parser()
    subs = next(a for a in top._actions if a.dest == "cmd").choices
    if not argv or argv == ["bench"]:
        return None                                    # the program's name in prose: `epserve`, `epserve bench`
    if argv[0] not in subs:
        return f"no command {argv[:1]}"
    if argv[0] == "bench":
        names = next(a for a in subs["bench"]._actions if a.dest == "what").choices
        if len(argv) < 2 or argv[1] not in names:
            return f"no benchmark {argv[1:2]}"
        if len(argv) == 2:
            return None                                # a name in prose: `epserve bench chaos`
    elif len(argv) == 1:
        return None                                    # `epserve report` named in prose
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            ns = top.parse_args(argv)
    except SystemExit as exc:
        return None if exc.code == 0 else err.getvalue().strip().splitlines()[-1]
    if ns.cmd == "bench":
        try:
            bench_args.check(ns)
        except Unavailable:                            # needs a GPU this machine lacks: the flags are fine
            pass
        except ValueError as exc:
            return str(exc)
    return None


def test_every_epserve_command_in_the_docs_parses():
    bad, seen = [], 0
    for path in DOCS:
        for snippet in shell_snippets(_text(path)):
            for argv in epserve_commands(snippet):
                seen += 1
                if (why := command_problem(argv)) is not None:
                    bad.append(f"{path.relative_to(ROOT)}: epserve {shlex.join(argv)}: {why}")
    assert seen > 30, f"only {seen} epserve commands found: is the extraction broken?"
    assert not bad, "command lines the CLI refuses:\n" + "\n".join(bad)


def test_a_wrong_command_would_be_caught():
    md = "```bash\nepserve serve --port 8000 && epserve bench step --phase prefill --mtp\n```\nand `epserve reprot`"
    cmds = [argv for s in shell_snippets(md) for argv in epserve_commands(s)]
    assert cmds == [["serve", "--port", "8000"], ["bench", "step", "--phase", "prefill", "--mtp"], ["reprot"]]
    assert command_problem(cmds[0]) is None
    assert "--phase" in command_problem(cmds[1]) and "no command" in command_problem(cmds[2])
    assert "--tokens" in command_problem(["bench", "kernels", "--tokens", "5"])


# ---- configuration keys --------------------------------------------------------------------------
def config_keys(cls=Config, prefix: str = "") -> dict[str, object]:
    """Every YAML key of the config dataclasses -> its default (a list for tuples; MISSING if required).
    A list of mappings (serve.tenants) is `key` and `key[].field`."""
    out, hints = {}, typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            out.update(config_keys(tp, key + "."))
            continue
        d = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        out[key] = list(d) if isinstance(d, tuple) else d
        inner = typing.get_args(tp)
        if inner and dataclasses.is_dataclass(inner[0]):
            out.update(config_keys(inner[0], key + "[]."))
    return out


def table_rows(md: str, first_header: str) -> list[list[str]]:
    """Cells of every row of the tables whose first header cell is `first_header`."""
    rows, inside = [], False
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            inside = False
        elif cells[0] == first_header:
            inside = True
        elif inside and not set(cells[0]) <= set("-: "):
            rows.append(cells)
    return rows


def documented_config(md: str) -> dict[str, str]:
    return {r[0].strip("`"): r[2] for r in table_rows(md, "key")}


def config_problems(md: str) -> list[str]:
    doc, keys = documented_config(md), config_keys()
    bad = [f"{k}: not in docs/config.md" for k in keys if k not in doc]
    bad += [f"{k}: documented, but config.py has no such key" for k in doc if k not in keys]
    for k in set(doc) & set(keys):
        want = "(required)" if keys[k] is dataclasses.MISSING else keys[k]
        got = doc[k] if doc[k] == "(required)" else yaml.safe_load(doc[k].strip("`"))
        if got != want:
            bad.append(f"{k}: documented default {doc[k]}, config.py says {want!r}")
    return bad


def yaml_keys(data: dict, documented: set[str], prefix: str = "") -> list[str]:
    """Keys a YAML file sets, as documented names (mappings are followed until a documented key)."""
    out = []
    for k, v in data.items():
        key = prefix + k
        if isinstance(v, dict) and key not in documented:
            out += yaml_keys(v, documented, key + ".")
        else:
            out.append(key)
    return out


def test_every_config_key_is_documented_with_its_default_and_nothing_else_is():
    assert not config_problems(_text(ROOT / "docs" / "config.md"))


def test_the_shipped_yaml_sets_only_documented_keys():
    documented = set(documented_config(_text(ROOT / "docs" / "config.md")))
    files = sorted((ROOT / "configs").glob("*.yaml")) + [ROOT / "examples" / "day_night_policy.yaml"]
    bad = [f"{f.name}: {k}" for f in files for k in yaml_keys(yaml.safe_load(f.read_text()) or {}, documented)
           if k not in documented]
    assert not bad, "keys set in YAML but not in docs/config.md: " + ", ".join(bad)


def test_a_wrong_config_table_would_be_caught():
    md = _text(ROOT / "docs" / "config.md")
    assert any("serve.max_n: not in" in p for p in config_problems(md.replace("| `serve.max_n` |", "| `x` |")))
    assert any("serve.port: documented default" in p for p in config_problems(md.replace("`8000`", "`8080`")))
    extra = md + "\n| key | type | default | meaning |\n|---|---|---|---|\n| `serve.colour` | str | `red` | no |\n"
    assert config_problems(extra) == ["serve.colour: documented, but config.py has no such key"]


# ---- the API table -------------------------------------------------------------------------------
def _models_in(tp) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for a in typing.get_args(tp) for m in _models_in(a)]


def request_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted paths of every field of a request model, `[]` marking a list (messages[].name)."""
    out = set()
    for name, f in model.model_fields.items():
        path = prefix + name
        out.add(path)
        is_list = "list[" in str(f.annotation)
        for sub in _models_in(f.annotation):
            out |= request_fields(sub, path + ("[]." if is_list else "."))
    return out


def api_problems(md: str) -> list[str]:
    rows = table_rows(md, "field")
    table, bad = {}, []
    for field, endpoint, status, *_ in rows:
        for ep in ("completions", "chat") if endpoint == "both" else (endpoint,):
            if (ep, field.strip("`")) in table:
                bad.append(f"{field} ({ep}): listed twice")
            table[(ep, field.strip("`"))] = status
    fields = {("completions", p) for p in request_fields(om.CompletionRequest)}
    fields |= {("chat", p) for p in request_fields(om.ChatRequest)}
    refused = {(ep, k) for ep in ("completions", "chat") for k in om.UNSUPPORTED}
    refused |= {("chat", f"messages[].{k}") for k in om.REFUSED_IN_MESSAGES}
    missing = sorted((fields | refused) - set(table))
    bad += [f"{p} ({ep}): a request field missing from docs/api.md" for ep, p in missing]
    bad += [f"{p} ({ep}): in docs/api.md but not a request field" for ep, p in sorted(set(table) - fields - refused)]
    for (ep, p), status in sorted(table.items()):
        if status not in ("applied", "refused"):
            bad.append(f"{p} ({ep}): status {status!r} (applied or refused; nothing is accepted and ignored)")
        elif ((ep, p) in refused) != (status == "refused"):
            bad.append(f"{p} ({ep}): status {status!r}, but UNSUPPORTED / REFUSED_IN_MESSAGES "
                       f"{'has' if (ep, p) in refused else 'lacks'} it")
    return bad


def test_the_api_table_lists_every_request_field_and_nothing_else():
    assert not api_problems(_text(ROOT / "docs" / "api.md"))


def test_a_wrong_api_table_would_be_caught():
    md = _text(ROOT / "docs" / "api.md")
    row = next(ln for ln in md.splitlines() if ln.startswith("| `seed` |"))
    assert api_problems(md.replace(row + "\n", "")) == [f"seed ({ep}): a request field missing from docs/api.md"
                                                       for ep in ("chat", "completions")]
    assert any("colour (chat)" in p for p in api_problems(md.replace(row, row + "\n| `colour` | chat | applied | x |")))
    assert any("ignored" in p for p in api_problems(md.replace(row, row.replace("| applied |", "| ignored |"))))
    assert any("seed (chat): status 'accepted'" in p         # issue 26: no field is accepted and left unused
               for p in api_problems(md.replace(row, row.replace("| applied |", "| accepted |"))))


# ---- paths and links -----------------------------------------------------------------------------
def repo_paths(md: str) -> set[str]:
    """Repository paths named in code (inline spans and fenced blocks): examples/..., benchmarks/...."""
    code = [body for _, body in FENCE.findall(md)] + SPAN.findall(FENCE.sub("", md))
    return {m for c in code for m in REPO_PATH.findall(c)}


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def link_problems(path: Path, md: str) -> list[str]:
    bad = []
    for p in sorted(repo_paths(md)):
        if not (list(ROOT.glob(p)) if "*" in p else (ROOT / p).exists()):
            bad.append(f"{p}: no such file in the repository")
    for target in LINK.findall(FENCE.sub("", md)):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"({target}): {file} does not exist")
        elif anchor and dest.suffix == ".md":
            heads = {slug(h) for h in re.findall(r"^#+ (.+)$", FENCE.sub("", dest.read_text()), re.M)}
            if anchor not in heads:
                bad.append(f"({target}): no heading #{anchor} in {dest.name}")
    return bad


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_and_link_resolves(path):
    bad = link_problems(path, _text(path))
    assert not bad, f"{path.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_a_broken_path_or_link_would_be_caught():
    doc = ROOT / "docs" / "operations.md"
    md = "see `examples/nope.py`, [config](config.md#no-such-heading), [x](gone.md) and [ok](config.md#serve)"
    assert link_problems(doc, md) == ["examples/nope.py: no such file in the repository",
                                      "(config.md#no-such-heading): no heading #no-such-heading in config.md",
                                      "(gone.md): gone.md does not exist"]
    assert slug("What survives which fault: the chaos suite") == "what-survives-which-fault-the-chaos-suite"


# ---- metrics ----------------------------------------------------------------------------------------
def test_every_exported_metric_is_in_the_operations_doc():
    md = _text(ROOT / "docs" / "operations.md")
    names = {fam.name for fam in ServeMetrics().registry.collect()}
    missing = sorted(n for n in names if not re.search(rf"`{n}(_total)?`", md))
    assert not missing, f"metrics /metrics exports that docs/operations.md does not name: {missing}"
