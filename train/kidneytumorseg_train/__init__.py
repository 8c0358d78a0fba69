"""Training data for KidneyTumorSeg: from KiTS19, KiTS21/23 or an nnU-Net raw dataset to a preprocessing cache.

Modules:
    datasets: find the cases of a dataset folder (layouts ``kits19``, ``kits23``, ``nnunet``), map its label
        values to 0 background / 1 kidney / 2 tumor, check every case, and write phantom datasets.
    plan: the dataset fingerprint (spacings, sizes, foreground intensities) and the training plan made from it
        (target spacing, patch size, intensity clipping and normalisation).
    cache: the cases preprocessed with the core's own functions onto the model grid, as ``.npy`` files that
        training memory-maps.
    splits: cross-validation folds and hold-out splits of case ids.

Every user mistake raises a ``KidneyTumorSegError`` (``DatasetError`` or ``ConfigError``) whose message says what
is wrong and what to do, as in the core library.
"""
