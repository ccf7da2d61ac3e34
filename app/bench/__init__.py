"""Serving benchmark client (`python -m esp_serve.app.bench_serving`): workloads, prompt building,
the streaming HTTP client, statistics and plots. Standard library + httpx (+ numpy,
matplotlib); it never imports ray or torch, so it runs from any machine with the repo."""
