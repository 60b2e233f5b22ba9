"""The images a run reads (stands on reidkit.run).

- images: reading an image upright (EXIF) or saying why it cannot be read
- files: when two paths are one file (a query is never matched with its own file)
- checks: every check made before any work (names, numbers, datasets, batches, matches)
- market: Market-1501's folder layout and file names (one definition)
- demo: the generated demo dataset, in Market-1501's layout
- own_data: folders and CSV files of your own: layouts, splits (no torch)
- own_dataset: those registered with Torchreid (register_image_dataset), split.json
- datapath: images decoded once and augmented per batch on the device
- training_files: the files a model was trained on (run folder, checkpoint) and the check
  that no test scores one
"""
