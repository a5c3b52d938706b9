import { after } from 'node:test'
import { randomBytes } from 'node:crypto'
import { TestEtcd, etcdMissing } from '../../test/helpers/etcd.js'
import { runCoreConformance } from './core.conformance.js'
import { EtcdCore } from './etcd-core.js'

let etcd: Promise<TestEtcd> | undefined
after(async () => { if (etcd !== undefined) await (await etcd).destroy() })

const missing = etcdMissing()
if (missing !== undefined) {
  process.stderr.write(`etcd-core tests skipped: ${missing}\n`)
} else {
  runCoreConformance('etcd', async () => {
    etcd ??= TestEtcd.start()
    const e = await etcd
    // Every test gets a namespace of its own on the one etcd.
    const prefix = `t-${randomBytes(6).toString('hex')}`
    const a = new EtcdCore({ servers: e.servers, prefix })
    const b = new EtcdCore({ servers: e.servers, prefix })
    return {
      a,
      b,
      cleanup: async () => {
        await a.close()
        await b.close()
      }
    }
  })
}
