"""Recordings in: long raw recordings become a transcribed, diarized, checked clip manifest.

A chain of small processors, each with one job, composed in order by `recording.process_recording`:
decode in windows (`source`) -> VAD (`speech/vad.py`) -> ASR with word timestamps (`speech/words.py`) ->
diarize (`speech/diarize.py`) -> cut at sentence ends and pauses (`cut`) -> loudness and quality (`quality`) ->
write the clips and the tables (`recording`). `outputs` merges every recording's result into the manifest that
`raw_audio_manifest` reads, with one speaker label per person across recordings. The `prepare` command and the
`recording_clips` / `recordings_manifest` assets call the same functions.
"""
