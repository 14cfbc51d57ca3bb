"""The book's exercises: one table for the chapters, the student edition, nbgrader and the grader.

Exercise 5.2 of the book is ``EXERCISES[5][1]``: its page heading is "Exercise 5.2: <title>", its
label ``ch05-ex2`` and its check ``m2f_lite.exercises.ch05.check_ex2``. ``answer`` is what the
student's cell defines, written as the check call's arguments: ``check_ex2(my_attention_mask)``
or ``check_ex4(**scores)``; the stub cell of the chapter defines exactly those names (a stub),
and so does the solution (the real thing). ``difficulty``: 1 predict or look up, 2 compute with a
few lines, 3 implement a function. ``minutes``: what a student who read the chapter needs.

The checks compare the student's answer with a reference. Where the package has the function the
exercise asks for, the exercise says so, and the check's docstring names what it compares with:
students write their own first and read the package's afterwards.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Exercise:
    chapter: int
    number: int
    title: str
    answer: str  # the check call's arguments, names the student's cell defines
    difficulty: int  # 1 predict, 2 compute, 3 implement
    minutes: int
    points: int = 1

    @property
    def label(self) -> str:
        return f"ch{self.chapter:02d}-ex{self.number}"

    @property
    def name(self) -> str:  # "5.2"
        return f"{self.chapter}.{self.number}"

    @property
    def call(self) -> str:
        """The check call as the chapter writes it, e.g. ``ch05.check_ex2(my_attention_mask)``."""
        return f"ch{self.chapter:02d}.check_ex{self.number}({self.answer})"

    @property
    def names(self) -> tuple[str, ...]:
        """The names the student's cell must define."""
        return tuple(a.strip().lstrip("*") for a in self.answer.split(","))


def _table(chapter: int, *rows: tuple) -> tuple[Exercise, ...]:
    return tuple(Exercise(chapter, i + 1, *row) for i, row in enumerate(rows))


EXERCISES: dict[int, tuple[Exercise, ...]] = {
    1: _table(
        1,
        ("Decode a panoptic PNG", "my_decode_ids", 3, 10),
        ("A semantic map as (labels, masks)", "my_semantic_to_targets", 3, 15),
        ("Predict the number of targets", "**target_counts", 1, 10),
        ("What LSJ does to the shape", "**lsj_sizes", 2, 10),
    ),
    2: _table(
        2,
        ("Predict the feature shapes", "feature_shapes", 1, 10),
        ("Count the parameters of a bottleneck", "n_params", 2, 10),
        ("The theoretical receptive field", "my_receptive_field", 3, 20),
        ("Implement the shifted-window mask", "my_window_mask", 3, 40),
    ),
    3: _table(
        3,
        ("Predict the shapes", "**msda_shapes", 1, 10),
        ("Where does head 3 look?", "**head3_point", 2, 15),
        ("Bilinear sampling of one point", "bilinear_sample", 3, 20),
        ("ms_deform_attn without grid_sample", "msda", 3, 45),
    ),
    4: _table(
        4,
        ("Count the encoder tokens", "**token_counts", 1, 10),
        ("Reference points", "reference_points", 3, 15),
        ("The FPN merge step", "fpn_step", 3, 15),
        ("One encoder layer", "encoder_layer", 3, 20),
    ),
    5: _table(
        5,
        ("The shape of the attention mask", "mask_shape", 1, 10),
        ("Build the attention mask", "my_attention_mask", 3, 20),
        ("The round robin", "stride_of", 2, 5),
        ("What does the mask cost?", "**score_counts", 2, 15),
    ),
    6: _table(
        6,
        ("Predict the number of loss terms", "num_terms", 1, 5),
        ("Implement the dice cost", "my_pairwise_dice", 3, 15),
        ("Matching by brute force", "my_brute_force_match", 3, 20),
        ("Implement importance sampling", "my_sample_points", 3, 30),
    ),
    7: _table(
        7,
        ("Predict the semantic output's shape", "sem_shape", 1, 10),
        ("Semantic inference in one line", "my_semantic", 3, 10),
        ("Which queries does panoptic inference keep?", "my_keep", 3, 15),
        ("Instance scores", "my_instance_scores", 3, 25),
    ),
    8: _table(
        8,
        ("IoU from a confusion matrix", "my_iou_from_confusion", 3, 15),
        ("Decide the matched pairs", "pq_matches", 2, 20),
        ("PQ of one category", "my_pq_one_category", 3, 25),
        ("Predict an AP", "ap50", 2, 15),
    ),
    9: _table(
        9,
        ("The learning rate at iteration i", "my_lr_at", 3, 20),
        ("Batch per GPU and epochs", "batch_answer", 2, 10),
        ("Who gets weight decay?", "my_lr_and_decay", 3, 25),
        ("Predict what resume does", "resume_answer", 2, 15),
    ),
    10: _table(
        10,
        ("The memory of the mask loss", "my_mask_loss_bytes", 2, 10),
        ("Official names", "key_names", 2, 15),
        ("Larger than the seed noise?", "my_seed_difference", 3, 15),
    ),
}


def chapter_module(chapter: int) -> ModuleType:
    """``m2f_lite.exercises.chNN``: the checks of a chapter."""
    return importlib.import_module(f"m2f_lite.exercises.ch{chapter:02d}")


def chapter_of_notebook(name: str) -> int:
    """The chapter number of a chapter's notebook file name, e.g. ``05_masked_attention.ipynb``
    (or a submission named after it, ``05_masked_attention-alice.ipynb``) -> 5."""
    head = name.rsplit("/", 1)[-1][:2]
    if not head.isdigit() or int(head) not in EXERCISES:
        raise ValueError(f"{name}: not a chapter's notebook (its name starts with 01 .. 10)")
    return int(head)
