#!/usr/bin/env bash
# Tune a detector through the REST API with curl: upload, create a job, poll, save scores.
#   examples/tune.sh TRAIN TEST [OUT.csv]
# The server: $SSAD_URL, else http://$SSAD_HOST:$SSAD_PORT (what `ssad-tune serve` listens on),
# else http://127.0.0.1:8000. The API key, if the server needs one: $SSAD_API_KEY.
# Try it with the bundled digits:  python examples/make_digits.py && examples/tune.sh \
#   examples/data/digits_train.npz examples/data/digits_test.npz
set -euo pipefail
HOST=${SSAD_HOST:-127.0.0.1}
if [ "$HOST" = 0.0.0.0 ]; then HOST=127.0.0.1; fi  # a wildcard bind address: this machine
URL=${SSAD_URL:-http://$HOST:${SSAD_PORT:-8000}}
TRAIN=${1:?usage: tune.sh TRAIN TEST [OUT.csv]}
TEST=${2:?usage: tune.sh TRAIN TEST [OUT.csv]}
OUT=${3:-scores.csv}
N_TRIALS=${N_TRIALS:-12}
TRAIN_STEPS=${TRAIN_STEPS:-400}
POLL_SECONDS=${POLL_SECONDS:-5}  # how often the job's status is read
field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
AUTH=()
if [ -n "${SSAD_API_KEY:-}" ]; then AUTH=(-H "Authorization: Bearer $SSAD_API_KEY"); fi
api() { curl -sS "${AUTH[@]}" "$@"; }

if ! curl -sS -o /dev/null "$URL/healthz"; then
  echo "cannot reach the server at $URL: is it running? Point this script at it with" \
       "SSAD_URL=URL (or SSAD_HOST and SSAD_PORT)" >&2
  exit 1
fi

post_file() {
  local body
  body=$(api -w '\n%{http_code}' -F "file=@$1" "$URL/v1/datasets")
  # 201: stored; 200: this content under this name was stored before (Dataset-Existing).
  case "$(tail -n1 <<<"$body")" in
    200|201) ;;
    *) echo "upload of $1 failed: $(head -n1 <<<"$body")" >&2; exit 1 ;;
  esac
  head -n1 <<<"$body" | field "['id']"
}

train_id=$(post_file "$TRAIN")
test_id=$(post_file "$TEST")
echo "train dataset $train_id, test dataset $test_id"

# One Idempotency-Key per run of this script: curl's retries of the request (a refused
# connection while the API restarts, no answer within 60 s, a 429 or a 5xx) return the
# same job instead of a second one, while running the script again tunes again (a key
# fixed by the datasets would replay the old job for 24 hours).
key="tune-$(python3 -c 'import uuid; print(uuid.uuid4())')"
job=$(api -f --retry 3 --retry-connrefused --max-time 60 -X POST "$URL/v1/jobs" \
  -H 'content-type: application/json' \
  -H "Idempotency-Key: $key" \
  -d "{\"train_dataset_id\": \"$train_id\", \"test_dataset_id\": \"$test_id\", \"n_trials\": $N_TRIALS, \"train_steps\": $TRAIN_STEPS}")
job_id=$(field "['id']" <<<"$job")
planned=$(field "['progress']['trials_planned']" <<<"$job")
refine=$(field "['plan']['refine']['trials']" <<<"$job")
[ "$refine" = 1 ] && trials=trial || trials=trials
echo "job $job_id queued: $(field "['plan']['screen']['trials']" <<<"$job") families screened, then $refine full-length $trials"

while true; do
  state=$(api -f "$URL/v1/jobs/$job_id")
  status=$(field "['status']" <<<"$state")
  done_=$(field "['progress']['trials_completed']" <<<"$state")
  echo "  $status: $done_/$planned trials"
  case $status in
    succeeded) break ;;
    failed|cancelled)  # its error, and its last event (e.g. "cancelled while running")
      why=$(api -f "$URL/v1/jobs/$job_id/events" | field "['events'][-1]['message']")
      err=$(field "['error'] or ''" <<<"$state")
      echo "job $status: ${err:+$err; }last event: $why" >&2
      exit 1 ;;
  esac
  sleep "$POLL_SECONDS"
done
echo "best: $(field "['best']" <<<"$state")"
api -f "$URL/v1/jobs/$job_id/scores?format=csv" -o "$OUT"
echo "scores written to $OUT"
