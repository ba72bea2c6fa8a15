"""Tokenizers: the hub tokenizer of a real LLM, or ville's own built-in one for tiny models and tests.

Nothing can be downloaded at run time on CI or in the demo, so the tiny recipes use `build_builtin_tokenizer()`: a
lower-casing WordPiece vocabulary of common English and video words, plus every printable ASCII character as a word
start and as a `##` continuation. Any ASCII text therefore tokenizes without `<unk>` (unknown words fall back to
characters), and the vocabulary stays small (636 entries, `len(builtin_vocab())`) so a tiny LLM's
embedding table is cheap.

Both kinds get the special tokens the model needs: `<emb>` (the learned embedding-step input), `<eoe>` (end of
embedding: the EOS of embedding mode, whose logit against `<emb>` is the stop signal of adaptive embedding
generation), `<match>` (the matching readout) and a pad token. `<eoe>` is not the text EOS: a stop loss that
raised the shared `<eos>` logit would make text generation end before its first word.
"""
from __future__ import annotations

import string

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EMB_TOKEN = "<emb>"
MATCH_TOKEN = "<match>"
EOE_TOKEN = "<eoe>"
EMBED_MODE_TOKENS = [EMB_TOKEN, EOE_TOKEN, MATCH_TOKEN]  # never generated as text
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", *EMBED_MODE_TOKENS]

# Common English plus the vocabulary of synthetic and real video captions/QA. Order is part of the format: appending
# is fine, reordering changes token ids of saved tiny models (their tokenizer is saved beside them, so they still load).
WORDS = """
a an the this that these those it its is are was were be been being has have had do does did done not no yes
and or but if then than so as at by for from in into of off on onto out over to up down with without within
while when where which who whom whose what why how many much more most less least few some any all each every
both either neither other another same different one two three four five six seven eight nine ten zero once twice
first second third fourth fifth last next previous before after during until since between through across around
left right top bottom middle center centre front back above below near far inside outside toward towards away
start starts started end ends ended beginning begin begins finally later earlier meanwhile again still also only
just very too quite slowly quickly fast slow suddenly then there here now time times seconds second frame frames
video videos clip clips scene scenes shot camera view shows shown showing show see seen look looks appear appears
appeared appearing disappear disappears disappeared disappearing vanish vanishes vanished
move moves moved moving motion movement go goes went going come comes came coming leave leaves left stay stays
stays stayed stop stops stopped turn turns turned turning rotate rotates rotated rotating rotation spin spins
spinning grow grows grew growing shrink shrinks shrank shrinking change changes changed changing become becomes
became jump jumps bounce bounces fall falls rise rises slide slides enter enters exit exits cross crosses
object objects shape shapes thing things color colour colors colours size sizes direction directions order count
number background foreground pattern texture position place event events action actions happen happens happened
circle circles square squares triangle triangles star stars diamond diamonds hexagon hexagons cross ring rings
rectangle rectangles ellipse ellipses oval pentagon heart arrow line lines dot dots ball box block disk disc
red green blue yellow purple orange cyan magenta white black gray grey pink brown teal violet gold silver navy
dark light bright pale plain striped stripes checkered checkerboard dotted gradient solid noisy colored coloured
small smaller smallest large larger largest big bigger biggest tiny huge medium little long short tall wide
clockwise counterclockwise anticlockwise horizontal vertical diagonal upward downward leftward rightward
question answer describe description detail detailed details summary summarize summarise caption captions text
query edit make makes made instead replace replaced same keep keeps kept
man woman men women person people boy girl child children player players dog cat horse car cars bike ball water
road street room table hand hands head face food kitchen field game music song dance dancing talking talks walk
walks walking run runs running play plays playing cook cooking drive driving ride riding swim swimming eat eating
sit sitting stand standing hold holding open opens close closes put puts take takes use uses using make making
someone something group team crowd stage house tree trees grass sky snow beach sea river city outdoor indoor
""".split()


def _dedupe(words: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def builtin_vocab() -> list[str]:
    chars = [c for c in string.printable if not c.isspace()]
    chars = _dedupe([c.lower() for c in chars])
    words = _dedupe([w.lower() for w in WORDS])
    return SPECIAL_TOKENS + chars + ["##" + c for c in chars] + [w for w in words if w not in chars]


def build_builtin_tokenizer() -> PreTrainedTokenizerFast:
    """ville's own WordPiece tokenizer (no download). Deterministic: same vocabulary, same ids, every time."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(builtin_vocab())}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=64))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(EMBED_MODE_TOKENS),
        clean_up_tokenization_spaces=True,
    )


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """`builtin` → ville's own tokenizer; otherwise a hub name or local path for `AutoTokenizer`, given the
    special tokens ville needs (the caller resizes the LLM's embeddings to `len(tokenizer)`)."""
    if name == "builtin":
        return build_builtin_tokenizer()
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # offline hub, typo'd name, missing local folder
        raise ValueError(
            f"could not load tokenizer {name!r} (hub name or local path expected; offline machines can use "
            f"'builtin' for randomly initialised models): {e}"
        ) from e
    missing = [t for t in EMBED_MODE_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": "<eos>"})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    return tok
