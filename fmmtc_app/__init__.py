"""The FMM-TC Screen dashboard's Streamlit glue, beside ``app.py``: the app is a client of the
core package (:mod:`fmmtc_core`), which never imports Streamlit.

- :mod:`.session`: settings, the cached database engine and model, who is signed in, plain
  errors, screenings in the worker;
- :mod:`.access`: the password gate, its sign-in page and the throttling of wrong passwords;
- :mod:`.uploads`: uploads staged in a private folder while they are checked;
- :mod:`.worker`: the one screening worker process of the server (no Streamlit import);
- :mod:`.demo`: the simulated demo cohort on the pages;
- :mod:`.demo_job`: loading it in the background, resumable (no Streamlit import).

Configuration (environment variables, or the same keys in ``.streamlit/secrets.toml``):

- ``FMMTC_DATABASE_URL`` / ``FMMTC_DATA_DIR``: where the cohort database lives (see README);
- ``FMMTC_MODEL_DIR``: the model used by default; ``FMMTC_MODELS_DIR``: a folder whose
  sub-folders are further installed models to choose from on the Model page;
- ``FMMTC_PASSWORD``: when set, every page asks for it (and for the user's name, which goes to
  the audit log with every screening and outcome);
- ``FMMTC_OPERATOR``: who the audit log names when no password is set;
- ``FMMTC_DEMO_COHORT_SIZE``: participants of the demo cohort (default 24);
- ``FMMTC_CLUSTER``: ``local:N`` or ``tcp://HOST:PORT``, a Dask cluster that screenings and the
  demo cohort are handed to (:mod:`fmmtc_app.dispatch`); unset, the server's own worker
  (environment only, not ``secrets.toml``).

This file imports nothing: the worker process imports :mod:`.worker` and must not pay for
Streamlit.
"""
