"""Speech models shared by ingest, evaluation and serving: ASR (faster-whisper) with voice activity detection,
speaker embeddings, and the text metrics that compare transcripts."""
