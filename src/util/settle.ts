/**
 * Like Promise.all, but settles only once every promise has: the first
 * rejection (in the order given) is thrown after the others finished.
 * For work on parts of one buffer or one fenced request: Promise.all
 * rejects at the first failure while the other parts still read into the
 * buffer (which its owner may then hand to someone else) or still write
 * under a fence the caller then leaves.
 */
export async function allSettledOrThrow<T> (promises: Iterable<Promise<T>>): Promise<T[]> {
  const results = await Promise.allSettled(promises)
  const out: T[] = []
  for (const r of results) {
    if (r.status === 'rejected') throw r.reason
    out.push(r.value)
  }
  return out
}
