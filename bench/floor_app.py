"""The benchmark's reference hop: a minimal Flask app that answers `POST /execute_code` with a
fixed result and no kernel behind it. Served by gunicorn gthread like the proxy, it shows in
the same run what the HTTP hop alone costs (gunicorn, Flask and the benchmark's HTTP client),
the floor under the proxy's own cost.
"""

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.get("/health")
def health():
    return jsonify(status="ok")


@app.post("/execute_code")
def execute_code():
    request.get_json()
    return jsonify(status="ok", outputs=[
        {"type": "execute_result", "data": {"text/plain": "2"}, "metadata": {}}])
