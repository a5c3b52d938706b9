/**
 * Control API routes the dashboard (/ui/, ui-assets.ts) reads besides the
 * ones the CLI uses: every image's I/O counters on one node and on every
 * node, the RTT between every pair of nodes, and a live feed of the
 * counters as server-sent events.
 *
 *   GET /v1/stats                this node: {node, time, images: [stats], errors}
 *   GET /v1/nodes/stats          every registered node's /v1/stats (or why not)
 *   GET /v1/rtt                  this node's recent RTT to each node, ms
 *                                (probed at most every RTT_FRESH_MS, directory.ts)
 *   GET /v1/nodes/rtt            every node's RTT to each other node, ms
 *                                (each one's /v1/rtt)
 *   GET /v1/live[?interval=MS]   text/event-stream: every MS (default 1000),
 *                                {time, nodes: GET /v1/nodes/stats}
 *
 * Counters are totals since each node started; the page makes rates of
 * the differences between two events (each node's `time` says when it read
 * its own). The feed is read with fetch() and the Authorization header,
 * not EventSource (which cannot send it): the token stays out of URLs.
 */
import { setTimeout as delay } from 'node:timers/promises'
import { invalidArgument } from '../errors.js'
import type { NodeIoStats } from '../node/directory.js'
import { errorReport } from '../node/stats.js'
import type { UkaiNode } from '../node/node.js'
import { show } from '../util/show.js'
import { onlyParams } from './data-routes.js'
import type { Route } from './server.js'

/** Bounds of the live feed's period, ms: each event asks every node once. */
export const LIVE_INTERVAL = { min: 250, max: 60_000, default: 1000 }

/** This node's answer to GET /v1/stats. */
export function nodeIoStats (node: UkaiNode): NodeIoStats {
  return {
    node: node.config.id,
    time: Date.now(),
    images: node.imageNames().map((name) => node.stats(name)),
    errors: errorReport(node.errors)
  }
}

/** The live feed's `interval` (ms), validated. */
function liveQuery (query: URLSearchParams): number {
  onlyParams(query, ['interval'])
  const v = query.get('interval')
  if (v === null) return LIVE_INTERVAL.default
  const n = Number(v)
  if (!/^\d{1,6}$/.test(v) || n < LIVE_INTERVAL.min || n > LIVE_INTERVAL.max) {
    throw invalidArgument(`'interval' must be a number of milliseconds from ${LIVE_INTERVAL.min} to ${LIVE_INTERVAL.max}, got ${show(v)}`, { key: 'interval' })
  }
  return n
}

export const uiRoutes: Route[] = [
  { method: 'GET', pattern: /^\/v1\/stats$/, handler: async (node) => nodeIoStats(node) },
  { method: 'GET', pattern: /^\/v1\/nodes\/stats$/, handler: async (node) => await node.images.directory.stats() },
  { method: 'GET', pattern: /^\/v1\/rtt$/, handler: async (node) => await node.images.directory.recentRtt() },
  { method: 'GET', pattern: /^\/v1\/nodes\/rtt$/, handler: async (node) => await node.images.directory.rtt() },
  {
    method: 'GET',
    pattern: /^\/v1\/live$/,
    stream: true,
    events: true,
    check: liveQuery,
    handler: async (node, _p, _b, query, emit, signal) => {
      const interval = liveQuery(query)
      let events = 0
      while (!signal.aborted) {
        emit({ time: Date.now(), nodes: await node.images.directory.stats() })
        events++
        try { await delay(interval, undefined, { signal }) } catch { break }
      }
      return { events }
    }
  }
]
