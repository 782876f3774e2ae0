"""`completion bash|zsh|fish`: a shell completion script, generated from the argparse tree.

The script knows every command, its options and what their values are (a choice, a file, a
folder, an environment id); environment ids are asked of the daemon (`env list`) when they are
completed. Regenerate it after an upgrade: it is a copy of this version's commands.

Each script walks the words typed so far the same way: a word that names a subcommand of the
command so far goes one level down; an option that takes a value skips that value; anything
else is a positional argument (counted, so that `env put ID FILE` completes an id, then a file).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass, field

from peerdaemon.cli.common import PROG, Commands

SHELLS = ("bash", "zsh", "fish")

INSTALL = {
    "bash": f"{PROG} completion bash > ~/.local/share/bash-completion/completions/{PROG}",
    "zsh": f"{PROG} completion zsh > ~/.zfunc/_{PROG}  (with fpath+=~/.zfunc before compinit)",
    "fish": f"{PROG} completion fish > ~/.config/fish/completions/{PROG}.fish",
}


def register(commands: Commands) -> None:
    p = commands.command(
        "completion",
        cmd_completion,
        "print a shell completion script (bash, zsh or fish)",
        example=f"{PROG} completion bash >> ~/.bash_completion",
    )
    p.add_argument("shell", choices=SHELLS, help="the shell to complete in")


def cmd_completion(args: argparse.Namespace) -> int:
    from peerdaemon.cli import build_parser  # the whole tree, this module's command included

    nodes = list(walk(build_parser()))
    print({"bash": bash, "zsh": zsh, "fish": fish}[args.shell](nodes), end="")
    return 0


# --- the tree -------------------------------------------------------------------------------------
@dataclass
class Option:
    flags: list[str]
    help: str
    value: str | None  # None: a flag; else what its value is (see `_kind`)


@dataclass
class Node:
    path: str  # "env/export"; "" for the top
    subcommands: list[tuple[str, str]] = field(default_factory=list)
    options: list[Option] = field(default_factory=list)
    positionals: list[str] = field(default_factory=list)  # what each is (see `_kind`)


def _kind(action: argparse.Action) -> str:
    """`choices a b`, `file`, `dir`, `id` or `any`: how to complete a value of `action`."""
    if action.choices is not None and not isinstance(action.choices, dict):
        return "choices " + " ".join(str(c) for c in action.choices)
    metavar = str(action.metavar or action.dest or "").upper()
    if metavar in ("FILE", "PATH"):
        return "file"
    if metavar == "DIR":
        return "dir"
    if metavar == "ID":
        return "id"
    return "any"


def _help(text: str | None) -> str:
    return "" if not text or text == argparse.SUPPRESS else " ".join(text.split())


def walk(parser: argparse.ArgumentParser, path: str = "") -> Iterator[Node]:
    node = Node(path)
    children: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: _help(a.help) for a in action._choices_actions}
            for name, child in action.choices.items():
                node.subcommands.append((name, helps.get(name, "")))
                children.append((name, child))
        elif action.option_strings:
            if action.help == argparse.SUPPRESS:
                continue
            value = None if action.nargs == 0 else _kind(action)
            node.options.append(Option(list(action.option_strings), _help(action.help), value))
        else:
            node.positionals.append(_kind(action))
    yield node
    for name, child in children:
        yield from walk(child, f"{path}/{name}" if path else name)


# --- bash -----------------------------------------------------------------------------------------
def _sh(text: str) -> str:
    """A single-quoted word for bash and zsh."""
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _table(
    name: str, cases: list[tuple[str, str]], default: str, subject: str = '"$1"'
) -> list[str]:
    """A shell function `name` whose body is `case SUBJECT in PATTERN) ACTION;; ... esac`."""
    lines = [f"{name}() {{", f"    case {subject} in"]
    for pattern, action in cases:
        lines.append(f"        {pattern}) {action} ;;")
    lines += [f"        *) {default} ;;", "    esac", "}"]
    return lines


def _value_tables(nodes: list[Node]) -> list[str]:
    """`_peerdaemon_value PATH OPTION` and `_peerdaemon_positional PATH N`: what to complete
    (empty: the option takes no value); shared by bash and zsh."""
    values = [
        (_sh(f"{n.path} {flag}"), f"echo {_sh(o.value)}")
        for n in nodes
        for o in n.options
        if o.value is not None
        for flag in o.flags
    ]
    positionals = [
        (_sh(f"{n.path} {i}"), f"echo {_sh(kind)}")
        for n in nodes
        if not n.subcommands
        for i, kind in enumerate(n.positionals)
        if kind != "any"
    ]
    return [
        *_table(f"_{PROG}_value", values, "return 1", '"$1 $2"'),
        *_table(f"_{PROG}_positional", positionals, "return 1", '"$1 $2"'),
    ]


_WALK = """\
    local cmdpath="" word sock="" kind="" i skip=0 npos=0
    for ((i = FIRST; i < CURRENT_INDEX; i++)); do
        word="${WORDS[i]}"
        if ((skip)); then
            skip=0
            [[ "${WORDS[i-1]}" == --socket ]] && sock="$word"
            continue
        fi
        case "$word" in
            --*=*) continue ;;
            -*) _peerdaemon_value "$cmdpath" "$word" >/dev/null && skip=1; continue ;;
        esac
        if _peerdaemon_is_subcommand "$cmdpath" "$word"; then
            cmdpath="${cmdpath:+$cmdpath/}$word"
            npos=0
        else
            npos=$((npos + 1))
        fi
    done
"""


def bash(nodes: list[Node]) -> str:
    subs = [(_sh(n.path), f"reply=({' '.join(name for name, _ in n.subcommands)})") for n in nodes]
    opts = [
        (_sh(n.path), f"reply=({' '.join(f for o in n.options for f in o.flags)})") for n in nodes
    ]
    lines = [
        f"# bash completion for {PROG}, generated by `{PROG} completion bash`.",
        f"# Install: {INSTALL['bash']}",
        "# (or: source <(peerdaemon completion bash) in ~/.bashrc)",
        "",
        *_table(f"_{PROG}_subcommands", [s for s in subs if s[1] != "reply=()"], "reply=()"),
        *_table(f"_{PROG}_options", opts, "reply=()"),
        *_value_tables(nodes),
        f"_{PROG}_is_subcommand() {{",
        "    local reply=()",
        f'    _{PROG}_subcommands "$1"',
        '    [[ " ${reply[*]} " == *" $2 "* ]]',
        "}",
        f"_{PROG}_ids() {{",
        f"    command {PROG} ${{1:+--socket \"$1\"}} env list 2>/dev/null | awk 'NR > 1 {{ print $1 }}'",
        "}",
        f"_{PROG}() {{",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" reply=()',
        _WALK.replace("FIRST", "1")
        .replace("CURRENT_INDEX", "COMP_CWORD")
        .replace("WORDS", "COMP_WORDS")
        .rstrip("\n"),
        "    if ((skip)); then",
        f'        kind="$(_{PROG}_value "$cmdpath" "$prev")"',
        '    elif [[ "$cur" == -* ]]; then',
        f'        _{PROG}_options "$cmdpath"',
        '        COMPREPLY=($(compgen -W "${reply[*]}" -- "$cur"))',
        "        return",
        "    else",
        f'        _{PROG}_subcommands "$cmdpath"',
        "        if ((${#reply[@]})); then",
        '            COMPREPLY=($(compgen -W "${reply[*]}" -- "$cur"))',
        "            return",
        "        fi",
        f'        kind="$(_{PROG}_positional "$cmdpath" "$npos")"',
        "    fi",
        '    case "$kind" in',
        '        choices\\ *) COMPREPLY=($(compgen -W "${kind#choices }" -- "$cur")) ;;',
        '        file) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur")) ;;',
        '        dir) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -d -- "$cur")) ;;',
        f'        id) COMPREPLY=($(compgen -W "$(_{PROG}_ids "$sock")" -- "$cur")) ;;',
        "        *) COMPREPLY=() ;;",
        "    esac",
        "}",
        f"complete -F _{PROG} {PROG}",
        "",
    ]
    return "\n".join(lines)


# --- zsh ------------------------------------------------------------------------------------------
def _described(name: str, help: str) -> str:
    return _sh(name.replace(":", "\\:") + (":" + help if help else ""))


def zsh(nodes: list[Node]) -> str:
    subs = [
        (_sh(n.path), f"reply=({' '.join(_described(name, h) for name, h in n.subcommands)})")
        for n in nodes
        if n.subcommands
    ]
    opts = [
        (
            _sh(n.path),
            f"reply=({' '.join(_described(f, o.help) for o in n.options for f in o.flags)})",
        )
        for n in nodes
    ]
    lines = [
        f"#compdef {PROG}",
        f"# zsh completion for {PROG}, generated by `{PROG} completion zsh`.",
        f"# Install: {INSTALL['zsh']}",
        "# (or, after compinit: source <(peerdaemon completion zsh) in ~/.zshrc)",
        "",
        *_table(f"_{PROG}_subcommands", subs, "reply=()"),
        *_table(f"_{PROG}_options", opts, "reply=()"),
        *_value_tables(nodes),
        f"_{PROG}_is_subcommand() {{",
        "    local -a reply",
        f'    _{PROG}_subcommands "$1"',
        "    (( ${reply[(I)$2(|:*)]} ))",
        "}",
        f"_{PROG}() {{",
        "    local -a reply",
        '    local cur="${words[CURRENT]}" prev="${words[CURRENT-1]}"',
        _WALK.replace("FIRST", "2")
        .replace("CURRENT_INDEX", "CURRENT")
        .replace("WORDS", "words")
        .rstrip("\n"),
        "    if ((skip)); then",
        f'        kind="$(_{PROG}_value "$cmdpath" "$prev")"',
        '    elif [[ "$cur" == -* ]]; then',
        f'        _{PROG}_options "$cmdpath"',
        "        _describe -o option reply",
        "        return",
        "    else",
        f'        _{PROG}_subcommands "$cmdpath"',
        "        if ((${#reply})); then",
        "            _describe command reply",
        "            return",
        "        fi",
        f'        kind="$(_{PROG}_positional "$cmdpath" "$npos")"',
        "    fi",
        '    case "$kind" in',
        "        choices\\ *) compadd -- ${=${kind#choices }} ;;",
        "        file) _files ;;",
        "        dir) _files -/ ;;",
        f'        id) compadd -- ${{(f)"$(command {PROG} ${{sock:+--socket $sock}} env list '
        "2>/dev/null | awk 'NR > 1 { print $1 }')\"} ;;",
        "    esac",
        "}",
        'if [[ "${zsh_eval_context[-1]}" == loadautofunc ]]; then',
        f'    _{PROG} "$@"',
        "else",
        f"    compdef _{PROG} {PROG}",
        "fi",
        "",
    ]
    return "\n".join(lines)


# --- fish -----------------------------------------------------------------------------------------
def _fish(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


FISH_HELPERS = f"""\
function __fish_{PROG}_state --description 'the command so far, the positionals after it'
    set -l words (commandline -opc)
    set -e words[1]
    set -l cmdpath ''
    set -l npos 0
    set -l skip 0
    for word in $words
        if test $skip = 1
            set skip 0
            continue
        end
        switch $word
            case '--*=*'
                continue
            case '-*'
                if contains -- $word (__fish_{PROG}_value_options $cmdpath)
                    set skip 1
                end
                continue
        end
        if contains -- $word (__fish_{PROG}_subcommands $cmdpath)
            if test -z "$cmdpath"
                set cmdpath $word
            else
                set cmdpath "$cmdpath/$word"
            end
            set npos 0
        else
            set npos (math $npos + 1)
        end
    end
    echo $cmdpath
    echo $npos
end

function __fish_{PROG}_at --description 'true at command $argv[1] (and positional $argv[2])'
    set -l state (__fish_{PROG}_state)
    test "$state[1]" = "$argv[1]"; or return 1
    test (count $argv) -lt 2; or test "$state[2]" = "$argv[2]"
end

function __fish_{PROG}_ids
    set -l words (commandline -opc)
    set -l socket
    if set -l i (contains -i -- --socket $words)
        set socket --socket $words[(math $i + 1)]
    end
    command {PROG} $socket env list 2>/dev/null | awk 'NR > 1 {{ print $1 }}'
end
"""


def _fish_switch(name: str, cases: list[tuple[str, list[str]]]) -> list[str]:
    lines = [f"function {name}", '    switch "$argv[1]"']
    for path, words in cases:
        lines += [
            f"        case {_fish(path)}",
            f"            printf '%s\\n' {' '.join(_fish(w) for w in words)}",
        ]
    lines += ["    end", "end"]
    return lines


def _fish_value(kind: str) -> str:
    if kind.startswith("choices "):
        return f"-x -a {_fish(kind[len('choices ') :])}"
    if kind == "file":
        return "-r -F"
    if kind == "dir":
        return "-x -a '(__fish_complete_directories)'"
    if kind == "id":
        return f"-x -a '(__fish_{PROG}_ids)'"
    return "-x"


def fish(nodes: list[Node]) -> str:
    lines = [
        f"# fish completion for {PROG}, generated by `{PROG} completion fish`.",
        f"# Install: {INSTALL['fish']}",
        "",
        *_fish_switch(
            f"__fish_{PROG}_subcommands",
            [(n.path, [name for name, _ in n.subcommands]) for n in nodes if n.subcommands],
        ),
        "",
        *_fish_switch(
            f"__fish_{PROG}_value_options",
            [
                (n.path, [f for o in n.options if o.value is not None for f in o.flags])
                for n in nodes
                if any(o.value is not None for o in n.options)
            ],
        ),
        "",
        FISH_HELPERS,
        f"complete -c {PROG} -f",
    ]
    for n in nodes:
        at = f"-n {_fish(f'__fish_{PROG}_at {_fish(n.path)}')}"
        for name, help in n.subcommands:
            lines.append(f"complete -c {PROG} {at} -a {_fish(name)} -d {_fish(help)}")
        for option in n.options:
            spec = " ".join(
                f"-l {_fish(f[2:])}" if f.startswith("--") else f"-s {_fish(f[1:])}"
                for f in option.flags
            )
            value = _fish_value(option.value) if option.value is not None else ""
            lines.append(
                f"complete -c {PROG} {at} {spec} {value} -d {_fish(option.help)}".replace("  ", " ")
            )
        if not n.subcommands:
            for i, kind in enumerate(n.positionals):
                if kind == "any":
                    continue
                at_i = f"-n {_fish(f'__fish_{PROG}_at {_fish(n.path)} {i}')}"
                if kind == "file":
                    lines.append(f"complete -c {PROG} {at_i} -F")
                else:
                    lines.append(f"complete -c {PROG} {at_i} {_fish_value(kind)}")
    lines.append("")
    return "\n".join(lines)
