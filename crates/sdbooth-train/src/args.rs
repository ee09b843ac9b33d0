//! `sdbooth train` flags under kohya's train_db.py names (owned by the CLI work; see issue 2).
