"""What a learner need not read: the plumbing that makes the method's files safe to run on real data.

mrm.py, data.py, train.py and finetune.py hold the method and call in here where they need a check, a
reader or a piece of bookkeeping. Nothing in this folder is MRM; every module is named for its job:

  errors.py       the error types a user can cause (a bad setting, record or checkpoint; a run gone NaN)
  console.py      what the scripts print: one-line errors, Ctrl-C and SIGTERM, progress bars on rank 0
  flags.py        a dataclass's fields as command-line flags, each number checked against its range
  settings.py     settings that cannot work (model sizes, flag combinations), refused before anything runs
  checkpoints.py  checkpoints written atomically and read safely; MAE's and the released MRM's weights
  runs.py         a run's bookkeeping: resume, its log.jsonl, what a stop keeps and says
  files.py        a run's folder: files written whole, one run a folder (a lock), an earlier run kept
  records.py      UTF-8 text and CSV readers, training.csv checked row by row
  images.py       any radiograph file to 8-bit gray; the fast crop path (JPEG draft decode, a 4-line resize)
  tokenizer.py    WordPiece vocabularies: the released file or one built from the reports, deterministically
  synthetic.py    the built-in synthetic radiographs, reports, labels and masks
  pictures.py     curves.png and recon.png, drawn with PIL
  plans.py        what finetune.py --dry_run prints: a run's whole recipe, resolved

Imports never cycle (tests/test_layout.py): this folder's modules import each other, recipes.py (tables),
and, in checkpoints.py alone, mrm.py (to check a file against the model); mrm.py imports errors.py and
settings.py, which import no module that imports mrm.py. Nothing here imports a script.
"""
