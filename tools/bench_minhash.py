"""Near-duplicate search: minisft's numpy MinHash/LSH against datasketch on the same shingle sets.

    python tools/bench_minhash.py /tmp/corpus-10k.json [--threshold 0.8 --shingle 2 --num-perm 128]

Both search greedily in file order with the exact-Jaccard check on every candidate (the rule of
`minisft data clean`), so they differ only in how signatures and candidates are found. datasketch
(pip install datasketch) runs twice: with its default banding (false positives and negatives
weighted equally) and with minisft's (tuned for recall). Prints the times and the duplicates found.
"""
import argparse
import time

import numpy as np

from minisft import curate
from minisft.data import normalize_record, read_records


def shingle_sets(path, shingle):
    hasher = curate.WordHasher()
    sets = []
    for where, rec in read_records(path):
        msgs = normalize_record(rec, where, allow_empty=True)["messages"]
        ws = [w for _, t in curate._texts(msgs) for w in curate.words(t)]
        sets.append(np.unique(curate.gram_hashes(hasher(ws), shingle)))
    return sets


def datasketch_search(sets, threshold, num_perm, params):
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    # datasketch's permutations take 32-bit hashes: the low half of minisft's 64-bit shingle hashes
    mins = MinHash.bulk([(s & np.uint64(0xFFFFFFFF)).tolist() for s in sets], num_perm=num_perm, seed=1,
                        hashfunc=int)
    t1 = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=params)
    dups = {}
    for i, m in enumerate(mins):
        best = None
        for j in sorted(lsh.query(m)):
            sim = curate.jaccard(sets[i], sets[j])
            if sim >= threshold and (best is None or sim > best[1]):
                best = (j, sim)
        if best:
            dups[i] = best
        else:
            lsh.insert(i, m)
    return dups, t1 - t0, time.perf_counter() - t1, (lsh.b, lsh.r)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--shingle", type=int, default=2)
    p.add_argument("--num-perm", type=int, default=128)
    a = p.parse_args()
    sets = shingle_sets(a.file, a.shingle)
    print(f"{a.file}: {len(sets)} records, {sum(map(len, sets))} shingles")
    t0 = time.perf_counter()
    ours = curate.near_duplicates(sets, a.threshold, a.num_perm, seed=0, progress=False)
    t = time.perf_counter() - t0
    print(f"minisft numpy   bands {curate.lsh_bands(a.num_perm, a.threshold)}: {t:6.2f} s, {len(ours)} duplicates")
    for name, params in [("default", None), ("minisft's", curate.lsh_bands(a.num_perm, a.threshold))]:
        dups, t_sig, t_lsh, br = datasketch_search(sets, a.threshold, a.num_perm, params)
        print(f"datasketch {name:9s} bands {br}: {t_sig + t_lsh:6.2f} s ({t_sig:.2f} s signatures, {t_lsh:.2f} s "
              f"LSH), {len(dups)} duplicates; found by one only: {len(set(dups) ^ set(ours))}")


if __name__ == "__main__":
    main()
