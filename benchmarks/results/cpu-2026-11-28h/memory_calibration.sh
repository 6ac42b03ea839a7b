set -e
cd /work/main
for cfg in "128 16 4 16" "256 16 4 16" "512 16 2 8" "128 48 8 32"; do
  set -- $cfg
  for b in $3 $4; do
    m=$( { /usr/bin/time -f "%M" .venv/bin/coral pretrain --phantom 2 --epochs 1 --batch-size $b --image-size $1 --base-filters $2 --no-cpu-bf16 --out /tmp/memcal.safetensors --device cpu >/dev/null 2>/tmp/memcal.err; } 2>&1 | tail -1 )
    echo "size $1 filters $2 batch $b peak_kb $(tail -1 /tmp/memcal.err)"
  done
done
