#!/usr/bin/env bash
# The GitHub Action's step, runnable locally: BNCHECK_MODELS="a.onnx models/" bash scripts/github_action.sh
# Annotations (::error ...) go to the log; with BNCHECK_SARIF=true the same run also writes bncheck.sarif.
set -uo pipefail
command="${BNCHECK_COMMAND:-inspect}"
case "$command" in inspect|probe) ;; *) echo "bncheck action: command must be inspect or probe, not '$command'" >&2; exit 2;; esac
read -r -a models <<< "${BNCHECK_MODELS:?BNCHECK_MODELS names the model files or folders}"
read -r -a extra <<< "${BNCHECK_ARGS:-}"
sarif=()
if [ "${BNCHECK_SARIF:-false}" = "true" ]; then
  sarif=(--output bncheck.sarif)
fi
# without a fail-on input the project's configuration decides (else error), as on the command line
fail_on=()
if [ -n "${BNCHECK_FAIL_ON:-}" ]; then
  fail_on=(--fail-on "$BNCHECK_FAIL_ON")
fi
bncheck "$command" "${models[@]}" --format github "${fail_on[@]}" "${sarif[@]}" "${extra[@]}"
status=$?
if [ -n "${GITHUB_OUTPUT:-}" ]; then
  echo "exit-code=$status" >> "$GITHUB_OUTPUT"
fi
exit "$status"
