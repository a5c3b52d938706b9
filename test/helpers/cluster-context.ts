/**
 * The cluster as a Volume sees it, for volume tests in one process: a real
 * lease from the metadata store, this "node's" fences, and no other node
 * to fence or to push changes to.
 */
import type { MetadataStore } from '../../src/metadata/store.js'
import { FenceTable } from '../../src/node/fences.js'
import type { ClusterContext } from '../../src/volume/volume.js'

export async function testCluster (store: MetadataStore, nodeId: string, fences = new FenceTable()): Promise<ClusterContext> {
  const lease = await store.grantLease(60)
  return {
    nodeId,
    fences,
    leaseId: () => lease.id,
    leaseValid: async () => {},
    leaseIsValid: () => true,
    changeDeadline: () => Date.now() + 10_000,
    mayTakeOver: () => false,
    fenceOthers: async () => undefined,
    publish: async () => {},
    notice: () => {}
  }
}
