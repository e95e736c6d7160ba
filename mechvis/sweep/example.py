"""A small real dataset built offline from installed packages (nothing downloaded, nothing copied
into the repository):

- text: real English sentences from the Python documentation shipped with the interpreter
  (`pydoc_data.topics`, the text of the Language Reference; PSF licence). Each item is a sentence
  without its last word, the word teacher-forced as the continuation, so the lens target is the
  word's first token. The first `n_paired` sentences that follow another sentence of the same topic
  also appear with that preceding sentence as context: conditions "alone" / "context", paired.
- photographs (for vision-language models): matplotlib's grace_hopper.jpg (US Navy, public
  domain), scikit-image's bundled astronaut.png (NASA, public domain), chelsea.png and coffee.png
  (CC0), rocket.jpg (SpaceX, public domain), scikit-learn's china.jpg and flower.jpg (CC BY 2.0,
  danielbuechele / vultilion on Flickr). Each photo appears as "original" and "blanked" (the
  central third filled with grey), paired by photo.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from pydoc_data.topics import topics

import matplotlib
import skimage
from PIL import Image

PHOTOS = {
    "grace_hopper": ("matplotlib", "US Navy photograph, public domain (matplotlib sample_data)"),
    "astronaut": ("skimage", "NASA, public domain (scikit-image data)"),
    "chelsea": ("skimage", "CC0, Stefan van der Walt (scikit-image data)"),
    "coffee": ("skimage", "CC0, Rachel Michetti (scikit-image data)"),
    "rocket": ("skimage", "SpaceX, public domain (scikit-image data)"),
    "china": ("sklearn", "CC BY 2.0, danielbuechele on Flickr (scikit-learn sample images)"),
    "flower": ("sklearn", "CC BY 2.0, vultilion on Flickr (scikit-learn sample images)"),
}
IMAGE_PROMPT = "What is in this picture?"
_SENTENCE = re.compile(r"[A-Z][A-Za-z ,;'\-]+\.")


def real_sentences(limit: int = 300) -> list[tuple[str, str]]:
    """(topic, sentence) pairs: prose sentences of 8–28 words from `pydoc_data.topics`, in topic order."""

    found = []
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for sentence in re.split(r"(?<=[.])\s+(?=[A-Z])", text):
            if 8 <= len(sentence.split()) <= 28 and _SENTENCE.fullmatch(sentence):
                found.append((key, sentence))
    return found[:limit]


def _photo(name: str, source: str):
    if source == "matplotlib":
        return Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    if source == "skimage":
        return Image.open(Path(skimage.__file__).parent / "data" / (name + (".jpg" if name == "rocket" else ".png"))).convert("RGB")
    from sklearn.datasets import load_sample_image  # scikit-learn: ~1.5 s to import, only when used

    return Image.fromarray(load_sample_image(f"{name}.jpg"))


def blank_centre(image, fill: tuple[int, int, int] = (128, 128, 128)):
    """The image with its central third (in each dimension) filled with `fill`."""
    blanked = image.copy()
    width, height = image.size
    blanked.paste(fill, (width // 3, height // 3, 2 * width // 3, 2 * height // 3))
    return blanked


def build_example(directory: "str | Path", *, n_sentences: int = 300, n_paired: int = 40, max_side: int = 256) -> dict[str, Path]:
    """Write text.jsonl and images.jsonl (with photos/) into `directory`; returns their paths."""
    directory = Path(directory)
    (directory / "photos").mkdir(parents=True, exist_ok=True)
    sentences = real_sentences(n_sentences)
    lines, paired = [], 0
    for index, (topic, sentence) in enumerate(sentences):
        words = sentence[:-1].split(" ")
        prompt, continuation = " ".join(words[:-1]), " " + words[-1]
        previous = sentences[index - 1] if index else None
        if paired < n_paired and previous is not None and previous[0] == topic:
            lines.append({"id": f"s{index}", "prompt": prompt, "continuation": continuation, "condition": "alone", "pair": f"s{index}"})
            lines.append({"id": f"s{index}+context", "prompt": previous[1] + " " + prompt, "continuation": continuation,
                          "condition": "context", "pair": f"s{index}"})
            paired += 1
        else:
            lines.append({"id": f"s{index}", "prompt": prompt, "continuation": continuation})
    text = directory / "text.jsonl"
    text.write_text("".join(json.dumps(line) + "\n" for line in lines))
    image_lines = []
    for name, (source, licence) in PHOTOS.items():
        photo = _photo(name, source)
        photo.thumbnail((max_side, max_side))
        for condition, picture in (("original", photo), ("blanked", blank_centre(photo))):
            path = directory / "photos" / f"{name}-{condition}.png"
            picture.save(path)
            image_lines.append({"id": f"{name}/{condition}", "prompt": IMAGE_PROMPT, "image": f"photos/{path.name}",
                                "condition": condition, "pair": name})
    images = directory / "images.jsonl"
    images.write_text("".join(json.dumps(line) + "\n" for line in image_lines))
    (directory / "LICENCES.txt").write_text(
        "text.jsonl: sentences from the Python documentation (pydoc_data.topics), PSF licence.\n"
        + "".join(f"photos/{name}-*.png: {licence}\n" for name, (_, licence) in PHOTOS.items())
    )
    return {"text": text, "images": images}
