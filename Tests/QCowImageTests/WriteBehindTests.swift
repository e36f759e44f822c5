import QCowImage
import Testing

/// The copy loops' write-behind queue: writes run in the order queued, each sees
/// the bytes its fill put in its buffer (buffers are reused), and the first error
/// a write throws stops later writes and comes back from `submit` or `finish`.
@Suite struct WriteBehindTests {
    final class Log: @unchecked Sendable {
        var entries: [(UInt64, [UInt8])] = []
    }

    struct Stop: Error {}

    @Test func writesRunInOrderWithTheirOwnBytes() throws {
        let pipeline = WriteBehind(buffers: 2, bufferSize: 4096)
        let log = Log()
        for i in 0..<200 {
            let n = 1 + i * 37 % 4096
            let value = UInt8(truncatingIfNeeded: i)
            if i % 7 == 3 {
                try pipeline.submit { log.entries.append((UInt64(i), [])) }
                continue
            }
            try pipeline.submit(fill: { buffer in
                buffer.baseAddress!.initializeMemory(as: UInt8.self, repeating: value, count: n)
                return n
            }, write: { data in
                log.entries.append((UInt64(i), Array(data)))
            })
        }
        try pipeline.finish()
        #expect(log.entries.map(\.0) == (0..<200).map(UInt64.init))
        for (i, bytes) in log.entries where i % 7 != 3 {
            #expect(bytes == [UInt8](repeating: UInt8(truncatingIfNeeded: i), count: 1 + Int(i) * 37 % 4096))
        }
    }

    @Test func theFirstErrorStopsLaterWrites() throws {
        let pipeline = WriteBehind(buffers: 3, bufferSize: 64)
        let log = Log()
        var thrown = false
        for i in 0..<50 {
            do {
                try pipeline.submit(fill: { _ in 1 }, write: { _ in
                    if i == 10 { throw Stop() }
                    log.entries.append((UInt64(i), []))
                })
            } catch is Stop {
                thrown = true
                break
            }
        }
        #expect(throws: Stop.self) { try pipeline.finish() }
        #expect(log.entries.map(\.0) == (0..<10).map(UInt64.init))
        _ = thrown  // a submit after the failure may or may not have seen it first
    }

    @Test func aFillThatThrowsQueuesNothing() throws {
        let pipeline = WriteBehind(buffers: 1, bufferSize: 16)
        let log = Log()
        #expect(throws: Stop.self) {
            try pipeline.submit(fill: { _ in throw Stop() }, write: { _ in log.entries.append((0, [])) })
        }
        // The buffer came back: the next submit does not wait forever.
        try pipeline.submit(fill: { _ in 4 }, write: { data in log.entries.append((1, Array(data))) })
        try pipeline.finish()
        #expect(log.entries.map(\.0) == [1])
    }
}
