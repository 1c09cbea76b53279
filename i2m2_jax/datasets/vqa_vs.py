"""`vqa_vs`: VQA-VS (Si et al., Findings of EMNLP 2022) on precomputed backbone features, with the
soft answer targets of the official I2M2/FIBER recipe.

In `config.data.manual_dir` (every name below is a config field; the defaults follow the VQA-VS
release, github.com/PhoebusSi/VQA-VS, whose Google Drive folder holds these files):

* questions and annotations per split in the VQA v2 JSON format, `config.data.questions` and
  `config.data.annotations` with {split} from `config.data.splits` (train 'Training', val 'Val',
  test 'IID-Test'): `Training/Training-Ques.json` and `Training/Training-Ans.json`, ...;
  a file holds a JSON list (as VQA-VS) or VQA v2's {"questions": [...]} / {"annotations": [...]}.
  Questions: `question_id`, `image_id`, `question`; annotations: `question_id`,
  `multiple_choice_answer` and `answers` (the ten annotators' {"answer": ...});
* features per split, `config.data.features` (default `features/{split}`: a folder of <key>.npy
  files or `features/{split}.npz`, datasets/features.py) with `question_id` [N] (the split's
  questions, in any order), `image` [N, Di], `text` [N, Dt] and `fused` [N, Df] (FIBER: 768,
  768, 1536; any sizes);
* the out-of-distribution test sets `config.data.ood_splits` ('QT,KW,KWP,QT+KW,KO,KOP,QT+KO,
  KW+KO,QT+KW+KO'), which are subsets of the IID test set: their question ids come from
  `OOD-Test/{split}/OOD-Test-{split}-Ques.json` (`config.data.ood_questions`), or, when
  `config.data.ood_ids_file` names it, from the release's `test_annotations.json`, which packs
  them as lists '<split without +>_qid' ('QTKW_qid', ...). They need no features of their own:
  they are the IID test examples with those ids, evaluated with the best checkpoint into
  results.json as `ood_<split>` and their unweighted mean `ood_mean`.

Targets, as the official recipe (divyam3897/I2M2: vqa_nlvr/fiber/utils/write_vqa.py, ViLT's):

* answers are normalised as the VQA evaluation does it (`normalize_answer`: punctuation, case,
  number words to digits, articles dropped, contractions restored);
* the answer vocabulary is the normalised `multiple_choice_answer`s that occur at least
  `config.data.min_answer_count` (9) times in train + val, in order of first occurrence (3,129
  answers on VQA v2);
* a question's score for an answer is `soft_score(n)` of the number n of its ten annotators who
  gave it: 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1.0 (the VQA evaluation's accuracy averaged over
  its ten leave-one-out annotator subsets); answers outside the vocabulary are dropped;
* training and validation questions without any answer in the vocabulary are dropped (as the
  official code does); test questions are all kept (such a question scores 0, as in the VQA-VS
  scorer, which divides by every question).

The VQA score of results.json is therefore the score of the predicted answer under these
targets. Where we differ from write_vqa.py: it counts the annotators' answers as written, so an
answer written differently from its normalised vocabulary entry (e.g. 'Two', 'yes.') scores 0
there; here they are normalised first (`config.data.normalize_annotator_answers=False` counts
them as written, as there). The VQA-VS repository's own scorer gives min(1, n / 3) instead
(0.33, 0.67, 1.0 for 1, 2, 3 annotators).

Errors (a missing file, a question without annotation, a feature file whose `question_id`s do not
match the split's questions, an OOD split the ids file does not have) name the file and the key.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
import numpy as np

from i2m2_jax.datasets import Dataset, register_dataset
from i2m2_jax.datasets import builder_utils
from i2m2_jax.datasets import features as features_lib

NAME = "vqa_vs"
MODALITIES = ("image", "text", "fused")
SPLIT_ROLES = ("train", "val", "test")
OOD_PREFIX = "ood_"
OOD_MEAN = "ood_mean"

# ---------------------------------------------------------------------------------------------
# Answer normalisation, as the VQA evaluation (VT-vision-lab/VQA, vqaEval.py) does it

# Removed when a space is next to one of them or the answer holds digit,digit; else a space.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# The contractions the evaluation restores. A form with one apostrophe is restored from the word
# without it ('dont' -> "don't"); one with several from the word missing any one of them
# ("couldnt've" and "couldn'tve" -> "couldn't've").
_CONTRACTED_FORMS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am
mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't
she'd've shouldn't shouldn't've should've somebody'd've somebody'll somebody's someone'd
someone'd've someone'll someone's something'd something'd've something'll that's there'd
there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've
weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll
who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've
you'd you'd've you'll you're you've""".split()


def _contractions() -> dict[str, str]:
  table = {}
  for form in _CONTRACTED_FORMS:
    cuts = [i for i, c in enumerate(form) if c == "'"]
    written = ([form.replace("'", "")] if len(cuts) == 1 else
               [form[:cut] + form[cut + 1:] for cut in cuts])
    table.update(dict.fromkeys(written, form))
  table["somebody'd"] = "somebodyd"  # the evaluation's table has this one backwards
  return table


_CONTRACTIONS = _contractions()


@functools.lru_cache(maxsize=None)
def normalize_answer(answer: str) -> str:
  """An answer as the VQA evaluation compares answers: punctuation removed (or a space), periods
  not followed by a digit removed, lower case, number words as digits, articles dropped,
  contractions restored, commas removed ('Two dogs.' -> '2 dogs', 'the cat' -> 'cat',
  'dont know' -> "don't know", '1,000' -> '1000')."""
  text = answer
  strip_all = bool(_DIGIT_COMMA_DIGIT.search(answer))
  for p in _PUNCTUATION:
    spaced = p + " " in answer or " " + p in answer
    text = text.replace(p, "" if spaced or strip_all else " ")
  text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text)
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
  return " ".join(words).replace(",", "")


# ---------------------------------------------------------------------------------------------
# Targets


def soft_score(count: int) -> float:
  """The target score of an answer given by `count` of the ten annotators (write_vqa.py)."""
  return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def answer_vocabulary(annotations: Iterable[Mapping[str, Any]], min_count: int) -> list[str]:
  """The normalised `multiple_choice_answer`s occurring at least `min_count` times, in order of
  first occurrence."""
  counts = collections.Counter(normalize_answer(a["multiple_choice_answer"]) for a in annotations)
  return [answer for answer, n in counts.items() if n >= min_count]


def answer_scores(answers: Sequence[Mapping[str, Any]], index: Mapping[str, int],
                  normalize: bool = True) -> dict[int, float]:
  """{vocabulary index: soft score} of one question from its annotators' answers (normalised
  first when `normalize`); answers outside the vocabulary are dropped."""
  counts = collections.Counter(normalize_answer(a["answer"]) if normalize else a["answer"]
                               for a in answers)
  return {index[a]: soft_score(n) for a, n in counts.items() if a in index}


def sparse_scores(per_question: Sequence[Mapping[int, float]],
                  num_classes: int) -> features_lib.SparseScores:
  width = max([len(s) for s in per_question] + [1])
  classes = np.full((len(per_question), width), -1, np.int32)
  scores = np.zeros((len(per_question), width), np.float32)
  for i, answer_scores_ in enumerate(per_question):
    classes[i, :len(answer_scores_)] = list(answer_scores_)
    scores[i, :len(answer_scores_)] = list(answer_scores_.values())
  return features_lib.SparseScores(classes, scores, num_classes)


# ---------------------------------------------------------------------------------------------
# Files


def read_json_list(path: str, key: str) -> list[dict[str, Any]]:
  """A JSON list, or the list under `key` of a JSON object (VQA v2's files)."""
  if not os.path.isfile(path):
    raise ValueError(f"{path}: missing; expected a JSON list of {key} (VQA v2 format).")
  with open(path) as f:
    try:
      data = json.load(f)
    except ValueError as e:
      raise ValueError(f"{path}: not valid JSON ({e}).") from e
  if isinstance(data, Mapping):
    if key not in data:
      raise ValueError(f"{path}: no key {key!r}; expected a JSON list of {key} or an object with "
                       f"{key!r} (found keys {sorted(data)[:10]}).")
    data = data[key]
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of {key}, found {type(data).__name__}.")
  return data


def _field(record: Mapping[str, Any], key: str, path: str, i: int) -> Any:
  if not isinstance(record, Mapping) or key not in record:
    raise ValueError(f"{path}: entry {i} has no key {key!r}.")
  return record[key]


def read_split(questions_path: str, annotations_path: str
               ) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """(question ids [N] in the questions file's order, each question's annotation)."""
  questions = read_json_list(questions_path, "questions")
  ids = np.array([int(_field(q, "question_id", questions_path, i))
                  for i, q in enumerate(questions)], np.int64)
  annotations = {}
  for i, a in enumerate(read_json_list(annotations_path, "annotations")):
    _field(a, "multiple_choice_answer", annotations_path, i)
    answers = _field(a, "answers", annotations_path, i)
    if not isinstance(answers, list) or not all(isinstance(x, Mapping) and "answer" in x
                                                for x in answers):
      raise ValueError(f"{annotations_path}: entry {i} key 'answers' is not a list of "
                       f"{{'answer': ...}} objects.")
    annotations[int(_field(a, "question_id", annotations_path, i))] = a
  missing = [int(q) for q in ids if int(q) not in annotations]
  if missing:
    raise ValueError(f"{annotations_path}: no annotation (key 'question_id') for {len(missing)} "
                     f"question(s) of {questions_path}, e.g. {missing[0]}.")
  return ids, [annotations[int(q)] for q in ids]


def feature_rows(feature_ids: np.ndarray, question_ids: np.ndarray, path: str) -> np.ndarray:
  """For each question, the row of the feature file holding it. ValueError naming the file and
  'question_id' unless the file holds exactly the split's questions, each once."""
  unique, counts = np.unique(feature_ids, return_counts=True)
  if (counts > 1).any():
    raise ValueError(f"{path}: key 'question_id' holds {int(unique[counts > 1][0])} more than "
                     f"once; expected each of the split's questions once.")
  missing = np.setdiff1d(question_ids, feature_ids)
  extra = np.setdiff1d(feature_ids, question_ids)
  if missing.size or extra.size:
    raise ValueError(f"{path}: key 'question_id' does not match the split's questions: "
                     f"{missing.size} question(s) without features (e.g. "
                     f"{missing[:3].tolist()}), {extra.size} feature row(s) of no question (e.g. "
                     f"{extra[:3].tolist()}).")
  order = np.argsort(feature_ids)
  return order[np.searchsorted(feature_ids, question_ids, sorter=order)]


def ood_question_ids(data_config, root: str, split: str) -> tuple[np.ndarray, str, str]:
  """(question ids of OOD split `split`, the file and key they came from)."""
  ids_file = data_config.get("ood_ids_file", "")
  if ids_file:
    path, key = os.path.join(root, ids_file), split.replace("+", "") + "_qid"
    if not os.path.isfile(path):
      raise ValueError(f"{path}: missing (config.data.ood_ids_file); expected the VQA-VS "
                       f"release's test_annotations.json with lists '<split>_qid'.")
    with open(path) as f:
      packed = json.load(f)
    if not isinstance(packed, Mapping) or key not in packed:
      raise ValueError(f"{path}: no key {key!r} for OOD split {split!r} (config.data.ood_splits); "
                       f"its keys: {sorted(packed)[:20] if isinstance(packed, Mapping) else []}.")
    return np.asarray(packed[key], np.int64), path, key
  path = os.path.join(root, data_config.ood_questions.format(split=split))
  if not os.path.isfile(path):
    raise ValueError(f"{path}: missing for OOD split {split!r} (config.data.ood_splits, "
                     f"config.data.ood_questions); expected its questions in the VQA v2 format.")
  questions = read_json_list(path, "questions")
  return (np.array([int(_field(q, "question_id", path, i)) for i, q in enumerate(questions)],
                   np.int64), path, "question_id")


# ---------------------------------------------------------------------------------------------
# Loader


def split_source(role: str, questions_path: str, ids: np.ndarray,
                 annotations: Sequence[Mapping[str, Any]], arrays: Mapping[str, np.ndarray],
                 features_path: str, index: Mapping[str, int],
                 normalize: bool) -> features_lib.FeatureSource:
  """One split's examples: its questions in file order (training and validation ones without an
  answer in the vocabulary dropped), each with its features' row and its soft scores."""
  rows = feature_rows(arrays["question_id"], ids, features_path)
  targets = [answer_scores(a["answers"], index, normalize) for a in annotations]
  keep = np.arange(len(ids)) if role == "test" else np.flatnonzero([bool(t) for t in targets])
  if len(keep) < len(ids):
    logging.info("%s: %d of %d questions have no answer in the vocabulary; dropped.",
                 questions_path, len(ids) - len(keep), len(ids))
  if not len(keep):
    raise ValueError(f"{questions_path}: the {role} split has no question"
                     + (" with an answer in the vocabulary." if len(ids) else "."))
  return features_lib.FeatureSource(
      {m: arrays[m] for m in MODALITIES}, rows[keep],
      scores=sparse_scores([targets[i] for i in keep], len(index)))


def ood_sets(data_config, root: str, test: features_lib.FeatureSource, test_ids: np.ndarray,
             test_questions: str) -> tuple[dict[str, features_lib.FeatureSource], list[str]]:
  """({'ood_<split>': the IID test examples of that OOD split}, the files the ids came from)."""
  position = {int(q): i for i, q in enumerate(test_ids)}
  sets, files = {}, []
  for split in features_lib.split_names(data_config.get("ood_splits", "")):
    ids, path, key = ood_question_ids(data_config, root, split)
    unknown = [int(q) for q in ids if int(q) not in position]
    if unknown:
      raise ValueError(f"{path}: key {key!r} (OOD split {split!r}) holds {len(unknown)} question "
                       f"id(s) not in the IID test questions {test_questions}, e.g. "
                       f"{unknown[0]}; the OOD sets are subsets of the IID test set.")
    sets[OOD_PREFIX + split] = test.subset(np.sort([position[int(q)] for q in ids]))
    files.append(path)
  return sets, files


@register_dataset(NAME)
def load_vqa_vs(data_config) -> Dataset:
  """The VQA-VS data set from config.data (module docstring)."""
  root = features_lib.manual_dir(data_config, "the VQA-VS release's folder (questions, "
                                 "annotations) holding the feature files too")
  names = dict(data_config.splits)
  paths = {role: (os.path.join(root, data_config.questions.format(split=names[role])),
                  os.path.join(root, data_config.annotations.format(split=names[role])))
           for role in SPLIT_ROLES}
  splits = {role: read_split(*paths[role]) for role in SPLIT_ROLES}
  vocabulary = answer_vocabulary([a for role in ("train", "val") for a in splits[role][1]],
                                 int(data_config.min_answer_count))
  if not vocabulary:
    raise ValueError(f"{paths['train'][1]}, {paths['val'][1]}: no normalised "
                     f"'multiple_choice_answer' occurs config.data.min_answer_count="
                     f"{data_config.min_answer_count} times; the answer vocabulary is empty.")
  index = {answer: i for i, answer in enumerate(vocabulary)}

  kinds = {"question_id": features_lib.INTEGERS, **{m: features_lib.FEATURES for m in MODALITIES}}
  feature_paths = {role: features_lib.resolve(root, data_config.features, names[role])
                   for role in SPLIT_ROLES}
  arrays = {path: features_lib.read(path, kinds) for path in feature_paths.values()}
  features_lib.check_same_shapes(arrays, MODALITIES)
  sources = {role: split_source(role, paths[role][0], *splits[role], arrays[path], path, index,
                                bool(data_config.get("normalize_annotator_answers", True)))
             for role, path in feature_paths.items()}
  extra, ood_files = ood_sets(data_config, root, sources["test"], splits["test"][0],
                              paths["test"][0])
  read = ([p for pair in paths.values() for p in pair] + ood_files
          + [f for path in arrays for f in features_lib.files_of(path)])
  train = arrays[feature_paths["train"]]
  return Dataset(
      name=NAME, modalities={m: tuple(train[m].shape[1:]) for m in MODALITIES},
      num_classes=len(vocabulary), sources=sources, targets={"scores": (len(vocabulary),)},
      task="soft_label", extra_test_splits=extra, extra_test_mean=OOD_MEAN if extra else "",
      provenance={"source": root, "num_answers": len(vocabulary),
                  "fingerprint": builder_utils.files_fingerprint(sorted(set(read)))})
