"""A small interpreter for the subset of Go's text/template that deploy.GO_TEMPLATES uses.

Ollama renders a Modelfile's TEMPLATE with Go's text/template; Ollama is not installed here, so
the tests render the course's templates with this and compare against the family's Jinja
template (the reference). Supported: text, `{{ .X }}` / `{{ $v.X }}` / `{{ $.X }}`, `{{ $v := e }}`,
`range $i, $m := e`, `if` / `else if` / `else` / `end`, the functions and, or, not, eq, ne, len,
slice, parentheses, string and int literals, and `{{-` / `-}}` trimming. Anything else raises.
"""

from __future__ import annotations

import json
import re

ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|:=|,|[^\s(),]+)')


def _lex(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)] with trim markers applied to the neighbouring text."""
    parts: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        parts.append(("text", text))
        parts.append(("action", m.group(2).strip()))
        pos, trim_next = m.end(), bool(m.group(3))
    tail = template[pos:]
    parts.append(("text", tail.lstrip() if trim_next else tail))
    return parts


def _parse(parts: list[tuple[str, str]], i: int = 0, stop: tuple[str, ...] = ()) -> tuple[list, int, str]:
    """A node list up to an action starting with one of `stop`; returns (nodes, next index, stopper)."""
    nodes: list = []
    while i < len(parts):
        kind, body = parts[i]
        i += 1
        if kind == "text":
            nodes.append(("text", body))
            continue
        word = body.split(" ", 1)[0]
        if word in stop:
            return nodes, i, body
        if word == "range":
            head = body[len("range"):].strip()
            names, _, expr = head.partition(":=")
            inner, i, end = _parse(parts, i, ("end",))
            nodes.append(("range", [n.strip() for n in names.split(",")], expr.strip(), inner))
        elif word == "if":
            branches = []
            cond = body[3:].strip()
            while True:
                inner, i, stopper = _parse(parts, i, ("else", "end"))
                branches.append((cond, inner))
                if stopper == "end":
                    break
                cond = stopper[len("else"):].strip()
                cond = cond[3:].strip() if cond.startswith("if ") else "true"
            nodes.append(("if", branches))
        elif re.match(r"^\$\w+\s*:=", body):
            name, _, expr = body.partition(":=")
            nodes.append(("set", name.strip(), expr.strip()))
        else:
            nodes.append(("print", body))
    if stop:
        raise ValueError(f"unclosed block: expected one of {stop}")
    return nodes, i, ""


def _value(token: str, dot, scope: dict):
    if token.startswith('"'):
        return json.loads(token)
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if token == "true":
        return True
    if token.startswith("$"):
        name, *fields = token.split(".")
        value = scope[name]
    elif token.startswith("."):
        value, fields = dot, token.split(".")[1:]
    else:
        raise ValueError(f"unsupported token {token!r}")
    for f in [f for f in fields if f]:
        value = value[f] if isinstance(value, dict) else getattr(value, f)
    return value


FUNCS = {
    "and": lambda *a: next((x for x in a if not x), a[-1]),
    "or": lambda *a: next((x for x in a if x), a[-1]),
    "not": lambda a: not a,
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "len": len,
    "slice": lambda a, start, end=None: a[start:end],
}


def _eval(expr: str, dot, scope: dict):
    tokens = TOKEN.findall(expr)

    def call(pos: int) -> tuple[object, int]:
        """Evaluate a command (function and arguments) until ')' or the end."""
        args: list = []
        while pos < len(tokens) and tokens[pos] != ")":
            if tokens[pos] == "(":
                value, pos = call(pos + 1)
                pos += 1  # the ')'
            elif tokens[pos] in FUNCS and not args:
                args.append(FUNCS[tokens[pos]])
                pos += 1
                continue
            else:
                value, pos = _value(tokens[pos], dot, scope), pos + 1
            args.append(value)
        if args and callable(args[0]) and args[0] in FUNCS.values():
            return args[0](*args[1:]), pos
        if len(args) != 1:
            raise ValueError(f"cannot evaluate {expr!r}")
        return args[0], pos

    return call(0)[0]


def _run(nodes: list, dot, scope: dict, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "print":
            out.append(str(_eval(node[1], dot, scope)))
        elif kind == "set":
            scope[node[1]] = _eval(node[2], dot, scope)
        elif kind == "if":
            for cond, inner in node[1]:
                if _eval(cond, dot, scope):
                    _run(inner, dot, dict(scope), out)
                    break
        elif kind == "range":
            names, expr, inner = node[1], node[2], node[3]
            for i, item in enumerate(_eval(expr, dot, scope)):
                local = dict(scope)
                if len(names) == 2:
                    local[names[0]], local[names[1]] = i, item
                elif names and names[0]:
                    local[names[0]] = item
                _run(inner, item, local, out)


def render(template: str, data: dict) -> str:
    """Render `template` with `data` as dot (and `$`), like Go's text/template Execute."""
    nodes, _, _ = _parse(_lex(template))
    out: list[str] = []
    _run(nodes, data, {"$": data}, out)
    return "".join(out)
