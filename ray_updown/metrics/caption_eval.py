"""Caption evaluation exactly as the COCO caption server: pycocoevalcap with its PTB tokenizer.

BLEU-1..4, METEOR, ROUGE-L and CIDEr(-D) always; SPICE only when the Stanford CoreNLP 3.6.0
jars it needs are already installed beside pycocoevalcap (SPICE would otherwise try to
download them at run time, which we never do). The PTB tokenizer and METEOR run on Java.

Files: references in the official `captions_{train,val}2014.json` layout ("annotations":
[{"image_id", "caption", ...}]); results in the server's layout [{"image_id", "caption"}],
named `captions_{val,test}2014_<name>_results.json`. Only the images of the results are
evaluated (as for the Karpathy test split, whose images are a subset of val2014).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from typing import Any

from ray_updown import storage
from ray_updown.errors import ConfigError, DataError, RayUpdownError

log = logging.getLogger(__name__)

ImageId = int | str
METRIC_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
_JAVA_HINT = ("install a Java runtime (Debian/Ubuntu: `apt-get install default-jre-headless`; "
              "macOS: `brew install openjdk`; conda: `conda install -c conda-forge openjdk`) "
              "and make sure `java` is on PATH")


class JavaMissingError(RayUpdownError):
    """pycocoevalcap's tokenizer and METEOR need a Java runtime, and none is on PATH."""


class EvaluationError(RayUpdownError):
    """A pycocoevalcap scorer (a Java process) failed."""


def spice_jar_dir() -> str:
    import pycocoevalcap.spice as spice_pkg

    return os.path.join(os.path.dirname(os.path.abspath(spice_pkg.__file__)), "lib")


def spice_available() -> bool:
    """True when SPICE's Stanford CoreNLP 3.6.0 jars are present (no download needed)."""
    lib = spice_jar_dir()
    return all(os.path.isfile(os.path.join(lib, jar)) for jar in SPICE_JARS)


def require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise JavaMissingError(f"Java is missing: pycocoevalcap's PTB tokenizer and METEOR run "
                               f"on Java; {_JAVA_HINT}")
    return java


# ----------------------------------------------------------------------------- files
def results_filename(split: str, name: str) -> str:
    """The COCO server's results file name: captions_{val,test}2014_<name>_results.json."""
    if split not in ("val", "test"):
        raise ConfigError(f"split must be 'val' or 'test', got {split!r}")
    if not name or any(ch in name for ch in "/\\ \t\n"):
        raise ConfigError(f"results name must be a non-empty word without '/' or spaces, "
                          f"got {name!r}")
    return f"captions_{split}2014_{name}_results.json"


def _image_id(value: Any, file: str, record: str) -> ImageId:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DataError(f"image_id must be an integer (or string), got {value!r}",
                        file=file, record=record)
    return value


def load_caption_references(uri: str) -> dict[ImageId, list[str]]:
    """{image_id: [reference captions]} from an official captions_*.json file.

    Images listed under "images" without any caption map to an empty list (an error only if
    results are evaluated for them).
    """
    data = storage.read_json(uri)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError('expected a COCO captions file: an object with an "annotations" list',
                        file=uri)
    references: dict[ImageId, list[str]] = {}
    for image in data.get("images") or []:
        if isinstance(image, dict) and "id" in image:
            references.setdefault(_image_id(image["id"], uri, "images"), [])
    for i, ann in enumerate(data["annotations"]):
        record = f"annotations[{i}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise DataError('annotation needs "image_id" and "caption"', file=uri, record=record)
        image_id = _image_id(ann["image_id"], uri, record)
        caption = ann["caption"]
        if not isinstance(caption, str):
            raise DataError(f"caption must be a string, got {type(caption).__name__}",
                            file=uri, record=record)
        if not caption.strip():
            raise DataError(f"empty reference caption for image_id {image_id}", file=uri,
                            record=record)
        references.setdefault(image_id, []).append(caption)
    if not any(references.values()):
        raise DataError("no reference captions", file=uri)
    return references


def load_caption_results(uri: str, references: Mapping[ImageId, list[str]] | None = None,
                         references_file: str | None = None) -> dict[ImageId, str]:
    """{image_id: caption} from a results file [{"image_id", "caption"}, ...].

    With `references`, every image must have at least one reference caption.
    """
    data = storage.read_json(uri)
    if not isinstance(data, list):
        raise DataError('expected a list of {"image_id", "caption"} records', file=uri)
    if not data:
        raise DataError("no results", file=uri)
    results: dict[ImageId, str] = {}
    first_seen: dict[ImageId, int] = {}
    for i, rec in enumerate(data):
        record = f"[{i}]"
        if not isinstance(rec, dict) or "image_id" not in rec or "caption" not in rec:
            raise DataError('record needs "image_id" and "caption"', file=uri, record=record)
        image_id = _image_id(rec["image_id"], uri, record)
        if not isinstance(rec["caption"], str):
            raise DataError(f"caption must be a string, got {type(rec['caption']).__name__}",
                            file=uri, record=record)
        if image_id in results:
            raise DataError(f"duplicate image_id {image_id} (first at [{first_seen[image_id]}])",
                            file=uri, record=record)
        results[image_id] = rec["caption"]
        first_seen[image_id] = i
    if references is not None:
        _check_results(results, references, uri, references_file, first_seen)
    return results


def write_caption_results(uri: str, captions: Mapping[ImageId, str]) -> None:
    """Write {image_id: caption} as the server's [{"image_id", "caption"}] list (atomic)."""
    records = []
    for image_id, caption in captions.items():
        _image_id(image_id, uri, f"image_id {image_id!r}")
        if not isinstance(caption, str):
            raise DataError(f"caption must be a string, got {type(caption).__name__}",
                            file=uri, record=f"image_id {image_id}")
        records.append({"image_id": image_id, "caption": caption})
    records.sort(key=lambda r: (isinstance(r["image_id"], str), r["image_id"]))
    storage.write_json(uri, records)


def _check_results(results: Mapping[ImageId, str], references: Mapping[ImageId, list[str]],
                   results_file: str | None, references_file: str | None,
                   position: Mapping[ImageId, int] | None = None) -> None:
    if not results:
        raise DataError("no results to evaluate", file=results_file)
    where = f" {references_file}" if references_file else ""
    for image_id in results:
        record = (f"[{position[image_id]}] image_id {image_id}" if position
                  else f"image_id {image_id!r}")
        refs = references.get(image_id)
        if refs is None:
            raise DataError(f"image is not in the references{where}", file=results_file,
                            record=record)
        if len(refs) == 0:
            raise DataError(f"image has no reference captions in the references{where}",
                            file=results_file, record=record)


# ------------------------------------------------------------------------ evaluation
def _one_line(caption: str) -> str:
    # the tokenizer reads one caption a line: any line break inside one would shift all others
    return " ".join(caption.splitlines())


def _tokenize(references: Mapping[ImageId, list[str]], results: Mapping[ImageId, str]):
    """PTB-tokenise references and results in one Java run (each start costs seconds)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    batch = {("ref", i): [{"caption": _one_line(c)} for c in references[i]] for i in results}
    batch.update({("res", i): [{"caption": _one_line(c)}] for i, c in results.items()})
    try:
        tokens = PTBTokenizer().tokenize(batch)
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"PTB tokenizer failed ({type(exc).__name__}: {exc})") from None
    gts, res = {}, {}
    for (kind, image_id), captions in batch.items():
        out = tokens.get((kind, image_id), [])
        if len(out) != len(captions):
            raise EvaluationError("PTB tokenizer returned fewer lines than captions "
                                  "(did the Java process fail? see its messages above)")
        (gts if kind == "ref" else res)[image_id] = out
    return gts, res


def evaluate_captions(references: Mapping[ImageId, list[str]], results: Mapping[ImageId, str],
                      spice: bool | None = None) -> dict[str, float]:
    """COCO caption metrics of `results` ({image_id: caption}) against `references`.

    Returns Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr (pycocoevalcap's CIDEr-D), SPICE when
    run, and num_images. `spice`: None = when its jars are present, True = required,
    False = never.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check_results(results, references, None, None)
    for image_id, caption in results.items():
        if not isinstance(caption, str):
            raise DataError(f"caption must be a string, got {type(caption).__name__}",
                            record=f"image_id {image_id!r}")
    require_java()
    run_spice = spice_available() if spice is None else spice
    if run_spice and not spice_available():
        raise ConfigError(f"SPICE needs {' and '.join(SPICE_JARS)} in {spice_jar_dir()}")
    if spice is None and not run_spice:
        log.warning("SPICE skipped: Stanford CoreNLP 3.6.0 jars not found in %s",
                    spice_jar_dir())

    gts, res = _tokenize(references, results)
    metrics: dict[str, float] = {}
    # pycocoevalcap prints progress on stdout, which belongs to the caller's JSON
    with contextlib.redirect_stdout(sys.stderr):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        metrics.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
        metrics["METEOR"] = _meteor(gts, res)
        metrics["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        metrics["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        if run_spice:
            from pycocoevalcap.spice.spice import Spice

            try:
                metrics["SPICE"] = float(Spice().compute_score(gts, res)[0])
            except Exception as exc:  # a failed Java subprocess
                raise EvaluationError(f"SPICE failed ({type(exc).__name__}: {exc})") from None
    metrics["num_images"] = len(results)
    return metrics


def _meteor(gts: dict, res: dict) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        return float(meteor.compute_score(gts, res)[0])
    except (ValueError, OSError) as exc:  # the Java process died: empty or broken output
        # compute_score raised while holding the lock that Meteor.__del__ waits for
        if meteor.lock.locked():
            meteor.lock.release()
        stderr = b""
        with contextlib.suppress(Exception):
            meteor.meteor_p.kill()
            stderr = meteor.meteor_p.stderr.read()[-300:]
        raise EvaluationError(f"METEOR failed ({type(exc).__name__}): "
                              f"{stderr.decode(errors='replace').strip()}") from None
    finally:
        del meteor  # closes the Java process now


def evaluate_caption_files(references_uri: str, results_uri: str,
                           spice: bool | None = None) -> dict[str, float]:
    """`ray-updown evaluate captions --references R --results X`: metrics of a results file."""
    references = load_caption_references(references_uri)
    results = load_caption_results(results_uri, references, references_uri)
    return evaluate_captions(references, results, spice=spice)
