"""What a learner need not read: the plumbing that makes the method's files safe to run on real data.

Nothing in this folder is MRM; every module is named for its job:

  run.py          a run as one object: its folder and lock, resume, log, saves, and a stop's one-line advice
  settings.py     the flags, each number checked as parsed; settings that cannot work; the --init weights
  checkpoints.py  checkpoints written atomically and read safely; MAE's and the released MRM's weights
  console.py      what the scripts print: one-line errors, Ctrl-C and SIGTERM, progress bars on rank 0
  errors.py       the error types a user can cause (a bad setting, record or checkpoint; a run gone NaN)
  files.py        files written whole; a log appended a line at a time and read back whatever a kill left
  records.py      UTF-8 text and CSV readers, training.csv checked row by row
  images.py       any radiograph file to 8-bit gray; the fast crop path (JPEG draft decode, a 4-line resize)
  tokenizer.py    WordPiece vocabularies: the released file or one built from the reports, deterministically
  synthetic.py    the built-in synthetic radiographs, reports, labels and masks
  pictures.py     curves.png and recon.png, drawn with PIL

Imports never cycle (tests/test_layout.py): these modules import each other, recipes.py (tables) and mrm.py
(to check a file against the model); mrm.py imports none of them, and nothing here imports a script.
"""
