"""Export and serve a trained adapter: merged folder, GGUF, Ollama Modelfile, an OpenAI-style server.

Where fine-tunes are lost is on the way out: a chat template or a stop token dropped while
merging, converting or serving, or a merge into 4-bit weights (COURSE.md traps 1, 4, 7, 11). Each
step here carries the family's template and every end-of-turn id along, uses the tools' own
mechanisms (peft's merge, llama.cpp's converter and quantizer, llama-cpp-python's server), writes
under a temporary name and renames when complete, and `verify` proves that what is served
answers like what was trained.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import evaluation, inference, models, registry, webdemo
from .registry import ChatFamily, Tutorial

LLAMA_CPP_VERSION = "0.3.36"  # llama-cpp-python whose source vendors the converter (pyproject `serve`)
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")  # under vendor/llama.cpp/
QUANT = "Q4_K_M"  # 4.8 bits a weight; the usual laptop choice
QUANT_FALLBACKS = ("Q4_0", "Q8_0")  # tried in turn when the asked type fails on this model
LOCAL = webdemo.LOCAL
MANIFEST = "export.json"


def _one_line(err: BaseException | str) -> str:
    text = str(err).strip().splitlines()
    return text[-1][:300] if text else type(err).__name__


def check_space(folder: Path, need: int, what: str) -> None:
    """Refuse before writing when the disk cannot hold `need` bytes (a full disk mid-write
    leaves a file that may look complete to a careless reader)."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OSError(f"not enough disk space for the {what} in {folder}: needs about "
                      f"{need / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB free; free some space "
                      "or pass another --out")


def weight_bytes(folder: Path) -> int:
    """Bytes of a model folder's weight files (an upper bound for a bf16 or f16 copy of it)."""
    return sum(f.stat().st_size for pattern in models.WEIGHT_FILES for f in Path(folder).glob(pattern))


# ---- 1a. the merged folder ---------------------------------------------------------------


def check_base(tutorial: Tutorial, adapter: Path, base: Path) -> None:
    """Refuse an adapter trained for another model before merging, in one line.

    peft loads a LoRA adapter onto any model whose layer names and shapes happen to match
    (the course's tiny DeepSeek and Qwen1.5 stand-ins do): the tokenizer saved beside the
    adapter (`inference.save_adapter`) must be the base's, chat template included.
    """
    mine, theirs = adapter / "tokenizer_config.json", base / "tokenizer_config.json"
    if not mine.is_file():
        return  # an adapter saved without its tokenizer: peft's own shape checks remain
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(adapter), AutoTokenizer.from_pretrained(base)
    if len(a) != len(b) or a.chat_template != b.chat_template:
        raise ValueError(f"adapter {adapter} was not trained on {tutorial.key}'s base model "
                         f"{base.name} (its tokenizer has {len(a)} tokens and "
                         f"{'the same' if a.chat_template == b.chat_template else 'another'} chat "
                         f"template; the base has {len(b)}): pass --tutorial of the notebook that "
                         "trained it")


def merge(tutorial: Tutorial, adapter: str | Path, out: str | Path, smoke_mode: bool | None = None,
          base: str | Path | None = None) -> Path:
    """The adapter folded into a bf16 copy of the base: a plain Hugging Face folder for vLLM,
    transformers or llama.cpp's converter (`inference.merge_and_save`), checked first."""
    adapter = inference.check_adapter(adapter)
    base_dir = models.check_model_dir(Path(base)) if base else models.model_path(tutorial, smoke_mode)
    check_base(tutorial, adapter, base_dir)
    out = Path(out)
    check_space(out.parent, weight_bytes(base_dir), "merged model")
    from safetensors import SafetensorError

    try:
        return inference.merge_and_save(tutorial, adapter, out, smoke_mode=smoke_mode,
                                        base=base, dtype="bfloat16")
    except (RuntimeError, KeyError, SafetensorError) as err:  # size mismatch, missing keys, cut file
        raise ValueError(f"adapter {adapter} does not load onto {tutorial.key}'s base model: "
                         f"{_one_line(err)}") from None


# ---- 1b. GGUF: llama.cpp's converter and quantizer --------------------------------------


def installed_llama_cpp() -> str | None:
    """The installed llama-cpp-python version, or None (`pip install -e ".[serve]"`)."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def converter(version: str | None = None, sdist: str | Path | None = None) -> Path:
    """The folder holding llama.cpp's `convert_hf_to_gguf.py`, `conversion/` and `gguf-py/`.

    No wheel ships the converter; the llama-cpp-python source distribution of the installed
    version vendors it with llama.cpp. It is fetched once with pip (`pip download --no-binary`,
    76 MB) into SELFLLM_HOME and only those files are kept, so the converter always matches
    the engine that will run its files. Offline: an instructor pre-fills SELFLLM_HOME, or drops
    the `.tar.gz` there (or passes `sdist`).
    """
    version = version or installed_llama_cpp() or LLAMA_CPP_VERSION
    home = registry.home() / "llama.cpp"
    folder = home / f"converter-{version}"
    if (folder / "convert_hf_to_gguf.py").is_file():
        return folder
    name = f"llama_cpp_python-{version}.tar.gz"
    archive = Path(sdist) if sdist else home / name
    if not archive.is_file():
        home.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                               ":all:", f"llama-cpp-python=={version}",
                               "-d", str(home)], capture_output=True, text=True)
        if done.returncode != 0 or not archive.is_file():
            raise RuntimeError(f"could not download llama-cpp-python {version}'s source (it holds "
                               f"llama.cpp's converter): {_one_line(done.stderr or done.stdout)}; "
                               f"offline, put {name} into {home}")
    tmp = Path(tempfile.mkdtemp(dir=home, prefix=".converter-"))
    try:
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and any(
                m.name[len(prefix):].startswith(f) for f in CONVERTER_FILES)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp, members=members, filter="data")
        if not (tmp / "convert_hf_to_gguf.py").is_file():
            raise RuntimeError(f"{archive} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        tmp.rename(folder)
    except OSError:  # another process finished first
        if not (folder / "convert_hf_to_gguf.py").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _stop_ids(folder: Path, family: ChatFamily) -> list[int]:
    return models.stop_ids(models.load_tokenizer(folder, family), family)


def convert(merged: str | Path, out: str | Path, family: ChatFamily, outtype: str = "f16") -> Path:
    """A GGUF file of a merged folder, written by llama.cpp's own `convert_hf_to_gguf.py`.

    Run through `llama_tools`, a small wrapper that adds every stop id of the family to the
    file's metadata and maps the smoke stand-ins' tokenizers (its docstring says why). Raises
    RuntimeError with the converter's last line where llama.cpp cannot convert the model.
    """
    merged, out = Path(merged), Path(out)
    check_space(out.parent, weight_bytes(merged), "GGUF file")
    ids = ",".join(map(str, _stop_ids(merged, family)))
    tmp = out.with_name(f".{out.name}.partial")
    try:
        done = _tool(["convert", str(converter()), ids, str(merged), "--outfile", str(tmp),
                      "--outtype", outtype])
        if done.returncode != 0 or not tmp.is_file():
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            reason = next((line for line in reversed(lines) if "Error" in line or "error" in line),
                          lines[-1] if lines else f"exit code {done.returncode}")
            raise RuntimeError(f"llama.cpp's converter could not convert {merged.name}: {reason[:300]}")
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _child_env() -> dict[str, str]:
    """This environment, with this package importable in a child process (a notebook's
    folder is not the course's)."""
    here = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}


def _tool(args: list[str]) -> subprocess.CompletedProcess:
    """Run `llama_tools` (llama.cpp's converter or quantizer) in a child process: their
    log goes to the child's captured output, and a crash in C cannot take the notebook down."""
    return subprocess.run([sys.executable, "-m", "selfllm_utils.llama_tools", *args],
                          capture_output=True, text=True, env=_child_env())


def quantize(gguf: str | Path, out_dir: str | Path, stem: str, quant: str = QUANT) -> tuple[Path, str]:
    """(file, type) quantized by llama.cpp's own quantizer (`llama_model_quantize`).

    K-quants (Q4_K_M) work on blocks of 256 weights; where a model's rows are shorter (the tiny
    stand-ins' 64) llama.cpp itself falls back per tensor (to Q5_0 and the like), and where the
    type fails outright the next of QUANT_FALLBACKS is tried: the type written is returned.
    """
    gguf, out_dir = Path(gguf), Path(out_dir)
    check_space(out_dir, gguf.stat().st_size, "quantized GGUF file")
    errors = []
    for kind in dict.fromkeys((quant.upper(), *QUANT_FALLBACKS)):
        out = out_dir / f"{stem}-{kind}.gguf"
        tmp = out.with_name(f".{out.name}.partial")
        try:
            done = _tool(["quantize", str(gguf), str(tmp), kind])
            if done.returncode == 0 and tmp.is_file():
                tmp.rename(out)
                return out, kind
            errors.append(f"{kind}: {_one_line(done.stderr or done.stdout)}")
        finally:
            tmp.unlink(missing_ok=True)
    raise RuntimeError("llama.cpp could not quantize " + gguf.name + ": " + "; ".join(errors))


def gguf_metadata(path: str | Path) -> dict:
    """The GGUF file's key-value metadata (not the tensors), read with gguf-py's GGUFReader."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores")
    return {k: f.contents() for k, f in reader.fields.items() if k not in skip}


def gguf_stop_ids(meta: dict) -> set[int]:
    """The ids a llama.cpp runtime stops on from the file's own keys: eos, eot and eom."""
    return {meta[f"tokenizer.ggml.{s}_token_id"] for s in ("eos", "eot", "eom")
            if f"tokenizer.ggml.{s}_token_id" in meta}


# ---- 1c. Ollama ------------------------------------------------------------------------------

# Go templates (Ollama's `.Messages` form) that write exactly what each family's chat template
# writes, checked by rendering the reference example (tests/test_deploy.py). No `{{-` trim
# markers: text is written as it stands. Ollama adds the generation prompt's equivalent by
# itself only through the template: after a last message that is not the assistant's. A system
# message comes from the request or, without one, from the Modelfile's SYSTEM (put first).
_EACH = "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
_ASK = '{{ if and $last (ne $m.Role "assistant") }}'  # the answer is the model's to write
GO_TEMPLATES = {
    "qwen2": (_EACH + '{{ if and (eq $i 0) (ne $m.Role "system") }}<|im_start|>system\n'
              "You are a helpful assistant.<|im_end|>\n{{ end }}"
              "<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n"
              + _ASK + "<|im_start|>assistant\n{{ end }}{{ end }}"),
    "qwen1.5": (_EACH + '{{ if and (eq $i 0) (ne $m.Role "system") }}<|im_start|>system\n'
                "You are a helpful assistant<|im_end|>\n{{ end }}"
                "<|im_start|>{{ $m.Role }}\n{{ $m.Content }}"
                '{{ if or (not $last) (ne $m.Role "assistant") }}<|im_end|>\n{{ end }}'
                + _ASK + "<|im_start|>assistant\n{{ end }}{{ end }}"),
    "deepseek": (_EACH + '{{ if eq $m.Role "user" }}User: {{ $m.Content }}\n\n'
                 '{{ else if eq $m.Role "assistant" }}Assistant: {{ $m.Content }}<｜end▁of▁sentence｜>'
                 '{{ else if eq $m.Role "system" }}{{ $m.Content }}\n\n{{ end }}'
                 + _ASK + "Assistant:{{ end }}{{ end }}"),
    "glm4": ("[gMASK]<sop>" + _EACH + "{{ if $m.Content }}<|{{ $m.Role }}|>\n{{ $m.Content }}{{ end }}"
             + _ASK + "<|assistant|>{{ end }}{{ end }}"),
}
# The begin token DeepSeek's template writes; left to the runtime when the GGUF says it adds one.
BOS_TEXT = {"deepseek": registry.DEEPSEEK_BOS}


def go_template(family: ChatFamily, add_bos: bool = False) -> str:
    """The Ollama TEMPLATE of a family; with the begin token unless the runtime adds it."""
    bos = BOS_TEXT.get(family.name, "") if not add_bos else ""
    return bos + GO_TEMPLATES[family.name]


def default_system(tutorial: Tutorial) -> str | None:
    """The system prompt the tutorial trained with: its own, else the template's default."""
    if tutorial.system_prompt:
        return tutorial.system_prompt
    return {"qwen2": "You are a helpful assistant.", "qwen1.5": "You are a helpful assistant"}.get(
        tutorial.family.name)


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ValueError('a Modelfile value cannot contain """')
    return f'"""{text}"""'


def modelfile(tutorial: Tutorial, gguf: str | Path, out: str | Path) -> Path:
    """An Ollama Modelfile for a GGUF: the family's template, every stop token, its system prompt.

    Ollama applies its Modelfile's TEMPLATE, not the GGUF's Jinja one, and stops on its
    PARAMETER stop strings: a Modelfile without them is the classic "never stops" (Ollama#6823).
    Greedy by default (temperature 0), as the course's proof compares answers token for token.
    """
    gguf, out = Path(gguf), Path(out)
    meta = gguf_metadata(gguf)
    system = default_system(tutorial)
    lines = [f"# {tutorial.title}: made by `selfllm export`; `ollama create NAME -f {out.name}`",
             f"FROM ./{gguf.name}",
             f"TEMPLATE {_quoted(go_template(tutorial.family, bool(meta.get('tokenizer.ggml.add_bos_token'))))}"]
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in tutorial.family.stop_tokens]
    lines += ["PARAMETER temperature 0", ""]
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.rename(out)
    return out


def read_modelfile(path: str | Path) -> dict:
    """{"from", "template", "system", "stop": [...], "parameters": {...}} of a Modelfile we wrote."""
    text = Path(path).read_text(encoding="utf-8")
    found: dict = {"stop": [], "parameters": {}, "system": None}
    i = 0
    lines = text.split("\n")
    while i < len(lines):
        line = lines[i]
        word, _, rest = line.partition(" ")
        if rest.startswith('"""'):
            body = rest[3:]
            while not body.endswith('"""'):
                i += 1
                body += "\n" + lines[i]
            rest = body[:-3]
        if word == "FROM":
            found["from"] = rest
        elif word in ("TEMPLATE", "SYSTEM"):
            found[word.lower()] = rest
        elif word == "PARAMETER":
            key, _, value = rest.partition(" ")
            if key == "stop":
                found["stop"].append(json.loads(value))
            else:
                found["parameters"][key] = value
        i += 1
    return found


# ---- the whole export --------------------------------------------------------------------


@dataclass
class Export:
    """What `export` wrote into one folder, and one line for each thing it could not do."""

    tutorial: str
    folder: Path
    merged: Path
    gguf: Path | None = None  # f16
    quantized: Path | None = None
    quant: str | None = None  # the type actually written
    modelfile: Path | None = None
    notes: list[str] = field(default_factory=list)

    def save(self) -> Path:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        path = self.folder / MANIFEST
        path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Export:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {MANIFEST}: not a finished `selfllm export` folder")
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{k: Path(v) if k in ("folder", "merged", "gguf", "quantized", "modelfile")
                      and v else v for k, v in data.items()})


def export(tutorial: Tutorial, adapter: str | Path, out: str | Path, quant: str | None = QUANT,
           gguf: bool = True, smoke_mode: bool | None = None, base: str | Path | None = None) -> Export:
    """Adapter -> merged bf16 folder, f16 GGUF, quantized GGUF and Ollama Modelfile in `out`.

    The merged folder is the one thing that must succeed; where llama.cpp cannot convert or
    quantize, one note says so and the other forms are still written. The manifest
    (export.json) is written last: a folder without it is not a finished export.
    """
    out = Path(out)
    if (out / MANIFEST).exists() or (out / "merged").exists():
        raise FileExistsError(f"{out} already holds an export: pass a new --out (nothing was overwritten)")
    stem = f"{tutorial.key}-{Path(adapter).name}"
    result = Export(tutorial.key, out, merge(tutorial, adapter, out / "merged", smoke_mode, base))
    if gguf:
        try:
            result.gguf = convert(result.merged, out / f"{stem}-F16.gguf", tutorial.family)
        except RuntimeError as err:
            result.notes.append(str(err))
    if result.gguf and quant:
        try:
            result.quantized, result.quant = quantize(result.gguf, out, stem, quant)
            if result.quant != quant.upper():
                result.notes.append(f"{quant} failed on this model; wrote {result.quant} instead")
        except (RuntimeError, ImportError) as err:
            result.notes.append(_one_line(err))
    if result.gguf:
        result.modelfile = modelfile(tutorial, result.quantized or result.gguf, out / "Modelfile")
    result.save()
    return result


# ---- 1d. the OpenAI-compatible server --------------------------------------------------------


def server_config(ggufs: dict[str, Path], port: int = 8000, host: str = LOCAL, public: bool = False,
                  n_ctx: int = 2048, threads: int | None = None) -> dict:
    """llama-cpp-python's server settings (its --config_file) for one or more GGUF files.

    Each file is a model the client names by its alias; `chat_format: chat_template.default`
    makes the server apply the template stored in the file (otherwise a template that happens
    to equal a built-in one is swapped for llama-cpp-python's copy). One server can hold several
    files (the tests' four families): it keeps one loaded and swaps on request. Threads: llama.cpp's
    workers spin while they wait, so more threads than free cores (a notebook kernel or a test
    beside it) slowed answers many times over here; half the cores is llama-cpp-python's default.
    """
    webdemo.check_address(host, public)
    threads = {"n_threads": threads} if threads else {}  # default: llama-cpp-python's, half the cores
    return {"host": host, "port": port, "models": [
        {"model": str(path), "model_alias": alias, "chat_format": "chat_template.default",
         "n_ctx": n_ctx, "verbose": False, **threads} for alias, path in ggufs.items()]}


class Server:
    """A running llama-cpp-python server; `with Server(...) as s:` stops it on the way out.

    Started in its own process group, so stopping it (SIGINT, then SIGKILL after a grace
    period) leaves nothing behind; `start` waits until it answers /v1/models, or stops it and
    raises TimeoutError in one line. `gguf` is one file (its alias is the file's stem) or
    {alias: file}.
    """

    def __init__(self, gguf: str | Path | dict[str, Path], port: int = 8000, host: str = LOCAL,
                 public: bool = False, timeout: float = 120.0, log: str | Path | None = None) -> None:
        self.ggufs = ({k: Path(v) for k, v in gguf.items()} if isinstance(gguf, dict)
                      else {Path(gguf).stem: Path(gguf)})
        self.port, self.host, self.public, self.timeout = port, host, public, timeout
        self.log = Path(log) if log else None
        self.process: subprocess.Popen | None = None
        self._config: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def alias(self) -> str:
        """The first model's name, as clients ask for it."""
        return next(iter(self.ggufs))

    def start(self) -> Server:
        for path in self.ggufs.values():
            if not path.is_file():
                raise FileNotFoundError(f"no GGUF file {path}: run `selfllm export` first")
        config = server_config(self.ggufs, self.port, self.host, self.public)
        webdemo.check_port(self.port, self.host)
        fd, name = tempfile.mkstemp(prefix="selfllm-server-", suffix=".json")
        self._config = Path(name)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        sink = open(self.log, "wb") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "selfllm_utils.llama_tools", "serve", "--config_file", name],
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, env=_child_env())
        import urllib.request

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"the server on {self.alias} exited with code "
                                   f"{self.process.returncode} while starting"
                                   + (f" (log: {self.log})" if self.log else ""))
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2):
                    return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"the server on {self.alias} did not answer within {self.timeout:g} s "
                           "(stopped); raise --timeout on a slow machine")

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGINT to the server's process group (uvicorn's clean stop), SIGKILL after `grace` s."""
        if self._config:
            self._config.unlink(missing_ok=True)
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()

    def __enter__(self) -> Server:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def run(gguf: str | Path, port: int = 8000, host: str = LOCAL, public: bool = False,
        timeout: float = 120.0) -> int:
    """Serve until Ctrl-C or SIGTERM (what `selfllm serve` calls); 0 after a clean stop."""
    server = Server(gguf, port, host, public, timeout)

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.start()
        if public:
            print(f"WARNING: the API listens on {host}:{port}: anyone who can reach this machine "
                  "can use the model", file=sys.stderr)
        print(f"OpenAI-compatible API: {server.url}  (model {server.alias!r}; Ctrl-C stops it)")
        return server.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


def stream_answer(client, model: str, messages: list[dict[str, str]], max_tokens: int = 256):
    """Yield the pieces of one greedy chat completion as the server streams them (a chat app's way)."""
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                            temperature=0, stream=True,
                                            extra_body={"top_k": 1, "repeat_penalty": 1.0})
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                yield choice.delta.content


# ---- 2. proof: the served model answers like the trained one ----------------------------------


@dataclass
class Answer:
    """One greedy answer of one form: its text, whether it ended on an end-of-turn token, and
    how many tokens it had before that token."""

    text: str
    stopped: bool
    tokens: int
    ids: list[int] | None = None  # the answer's token ids where the form gives them (transformers)


FORMS = ("adapter", "merged", "gguf-f16 server", "gguf-quantized")  # (i) .. (iv)
MUST_EQUAL = FORMS[1:3]  # (ii) and (iii) must answer exactly as (i); (iv) reports a share


@dataclass
class Proof:
    """The held-out prompts' answers of each form, and what differs from (i) base + adapter."""

    tutorial: str
    prompts: list[str]
    answers: dict[str, list[Answer]]
    differences: dict[str, list[str | None]] = field(default_factory=dict)  # None: equal

    def agreement(self, form: str) -> float:
        """Share of prompts where `form` answered exactly as base + adapter."""
        return sum(d is None for d in self.differences[form]) / len(self.prompts)

    def failures(self) -> list[str]:
        """One line per broken promise: (ii)/(iii) differ from (i), or an answer never ended."""
        lines = [f"{form}: {diff}" for form in MUST_EQUAL if form in self.differences
                 for diff in self.differences[form] if diff]
        lines += [f"{form}: {p!r} ran to the token limit without an end-of-turn token"
                  for form, answers in self.answers.items() for p, a in zip(self.prompts, answers)
                  if not a.stopped]
        return lines

    @property
    def ok(self) -> bool:
        return not self.failures()

    def table(self) -> str:
        forms = list(self.answers)
        head = f"{'form':18}{'same as (i)':>12}{'ended turn':>12}{'tokens':>8}"
        rows = [head]
        for form in forms:
            answers = self.answers[form]
            same = "-" if form == forms[0] else f"{self.agreement(form):.0%}"
            rows.append(f"{form:18}{same:>12}{sum(a.stopped for a in answers) / len(answers):>12.0%}"
                        f"{sum(a.tokens for a in answers) / len(answers):>8.1f}")
        return "\n".join(rows)


def first_difference(tokenizer, prompt: str, reference: Answer, other: Answer) -> str | None:
    """None when `other` answered exactly as `reference`; else the prompt and the first token
    where they part (answers without ids are tokenized: a server returns text)."""
    if (other.text, other.stopped, other.tokens) == (reference.text, reference.stopped, reference.tokens):
        return None
    a = reference.ids or tokenizer(reference.text, add_special_tokens=False)["input_ids"]
    b = other.ids or tokenizer(other.text, add_special_tokens=False)["input_ids"]
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    show = (lambda ids: repr(tokenizer.decode(ids[k:k + 1])) if k < len(ids) else "(end)")
    return (f"{prompt!r}: token {k} is {show(b)}, base + adapter has {show(a)} "
            f"(ended turn: {other.stopped} vs {reference.stopped})")


def _transformers_answers(model, tokenizer, tutorial: Tutorial, prompts: list[str], max_new: int) -> list[Answer]:
    out = []
    for p in prompts:
        r = inference.chat(model, tokenizer, p, tutorial.family, system=tutorial.system_prompt,
                           max_new_tokens=max_new)
        ids = r.token_ids[:-1] if r.stopped else r.token_ids
        out.append(Answer(tokenizer.decode(ids, skip_special_tokens=True).strip(), r.stopped, len(ids), ids))
    return out


def _server_answers(url: str, model: str, tutorial: Tutorial, prompts: list[str], max_new: int) -> list[Answer]:
    """The official `openai` client against the running server, greedy."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="not-needed-locally")
    out = []
    for p in prompts:
        r = client.chat.completions.create(model=model, messages=inference.messages(p, tutorial.system_prompt),
                                           max_tokens=max_new, temperature=0,
                                           extra_body={"top_k": 1, "repeat_penalty": 1.0})
        choice = r.choices[0]
        out.append(Answer((choice.message.content or "").strip(), choice.finish_reason == "stop",
                          r.usage.completion_tokens))
    return out


def export_server(exported: Export, port: int = 8765, **kwargs) -> Server:
    """A server holding the export's GGUF files (not started): "f16" and its quantized type."""
    files = {"f16": exported.gguf, exported.quant: exported.quantized}
    return Server({alias: path for alias, path in files.items() if alias and path}, port=port, **kwargs)


def verify(tutorial: Tutorial, adapter: str | Path, exported: Export | str | Path,
           smoke_mode: bool | None = None, prompts: list[str] | None = None,
           max_new_tokens: int | None = None, port: int = 8765, server: Server | None = None,
           base: str | Path | None = None) -> Proof:
    """Ask the held-out prompts of (i) base + adapter in transformers, (ii) the merged folder,
    (iii) the f16 GGUF and (iv) the quantized GGUF, both through llama-cpp-python's server
    with the official `openai` client; greedy. (ii) and (iii) must equal (i) and every answer
    must end its turn (`Proof.ok`, `Proof.failures`); (iv)'s agreement is a share (4 bits a
    weight change some answers).

    `server`: a running `export_server(exported)`; without it one is started on `port` and
    stopped afterwards.
    """
    smoke = registry.smoke_mode() if smoke_mode is None else smoke_mode
    exported = exported if isinstance(exported, Export) else Export.load(exported)
    limit, budget_new = evaluation.budget(tutorial, smoke)
    prompts = prompts or evaluation.heldout_prompts(tutorial, limit)
    max_new = max_new_tokens or budget_new
    model, tokenizer = inference.load_adapter(tutorial, adapter, smoke_mode=smoke, base=base)
    answers = {FORMS[0]: _transformers_answers(model, tokenizer, tutorial, prompts, max_new)}
    del model
    merged, _ = models.load_model(tutorial, smoke_mode=smoke, path=exported.merged)
    answers[FORMS[1]] = _transformers_answers(merged.eval(), tokenizer, tutorial, prompts, max_new)
    del merged
    if exported.gguf:
        with contextlib.ExitStack() as stack:
            if server is None:
                server = stack.enter_context(export_server(exported, port))
            alias = {path: name for name, path in server.ggufs.items()}
            for form, path in ((FORMS[2], exported.gguf), (FORMS[3], exported.quantized)):
                if path:
                    answers[form] = _server_answers(server.url, alias[path], tutorial, prompts, max_new)
    reference = answers[FORMS[0]]
    differences = {form: [first_difference(tokenizer, p, r, a) for p, r, a in zip(prompts, reference, got)]
                   for form, got in answers.items() if form != FORMS[0]}
    return Proof(tutorial.key, prompts, answers, differences)
