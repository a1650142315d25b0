"""Where models come from and go to: checkpoint directories, registered models and Hugging
Face models opened as one `SourceModel` (sources), Hugging Face import and export, and the
completions `gptflow generate` prints."""
