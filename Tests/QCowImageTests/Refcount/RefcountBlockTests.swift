import Foundation
@testable import QCowImage
import Testing
import TestSupport

/// Refcount block entries at every refcount order, and interop with images QEMU made.
@Suite struct RefcountBlockTests {
    @Test(arguments: 0...6)
    func roundTripsEveryEntry(order: Int) {
        let clusterSize = 512
        let count = RefcountCodec.entriesPerBlock(clusterSize: clusterSize, order: order)
        #expect(count == 4096 >> order)
        let maxValue = RefcountCodec.maxValue(order: order)
        var rng = SeededRandom(seed: UInt64(order) + 100)
        var model = [UInt64](repeating: 0, count: count)
        var block = [UInt8](repeating: 0, count: clusterSize)
        for _ in 0..<(count * 3) {
            let i = Int.random(in: 0..<count, using: &rng)
            let v = order == 6 ? rng.next() : UInt64.random(in: 0...maxValue, using: &rng)
            model[i] = v
            block.withUnsafeMutableBytes { _ = RefcountCodec.set($0, order: order, index: i, value: v) }
        }
        let decoded = block.withUnsafeBytes { raw in (0..<count).map { RefcountCodec.get(raw, order: order, index: $0) } }
        #expect(decoded == model)
    }

    /// Sub-byte widths put entry 0 in the least significant bits (QEMU's get_refcount_ro0..2); wider ones are big-endian.
    @Test func bitLayoutMatchesTheSpec() {
        func encode(order: Int, index: Int, value: UInt64) -> [UInt8] {
            var b = [UInt8](repeating: 0, count: 16)
            b.withUnsafeMutableBytes { _ = RefcountCodec.set($0, order: order, index: index, value: value) }
            return Array(b.prefix(8))
        }
        #expect(encode(order: 0, index: 0, value: 1) == [0x01, 0, 0, 0, 0, 0, 0, 0])
        #expect(encode(order: 0, index: 7, value: 1) == [0x80, 0, 0, 0, 0, 0, 0, 0])
        #expect(encode(order: 1, index: 1, value: 3) == [0x0c, 0, 0, 0, 0, 0, 0, 0])
        #expect(encode(order: 2, index: 1, value: 0xa) == [0xa0, 0, 0, 0, 0, 0, 0, 0])
        #expect(encode(order: 3, index: 2, value: 0x7f) == [0, 0, 0x7f, 0, 0, 0, 0, 0])
        #expect(encode(order: 4, index: 1, value: 0x1234) == [0, 0, 0x12, 0x34, 0, 0, 0, 0])
        #expect(encode(order: 5, index: 1, value: 0x0102_0304) == [0, 0, 0, 0, 1, 2, 3, 4])
        #expect(encode(order: 6, index: 0, value: 0x0102_0304_0506_0708) == [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(RefcountCodec.maxValue(order: 0) == 1)
        #expect(RefcountCodec.maxValue(order: 6) == UInt64.max)
    }

    /// Our refcounts of an image QEMU wrote agree with its layout: header, tables, data all at 1.
    @Test(arguments: [1, 2, 4, 8, 16, 32, 64])
    func readsQemuRefcounts(bits: Int) throws {
        let dir = TempDir()
        let path = dir.file("a.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,refcount_bits=\(bits)", path, "4M")
        try Tools.qemuIO(path, format: "qcow2", ["write -P 0x5a 0 300k"])
        let image = try #require(try openRetryingLock(path, writable: true) as? QCowFile)
        defer { image.close() }
        #expect(try image.refcount(ofHostOffset: 0) == 1)
        #expect(try image.refcount(ofHostOffset: image.header.refcountTableOffset) == 1)
        #expect(try image.refcount(ofHostOffset: image.header.l1TableOffset) == 1)
        let status = try image.layerStatus(at: 0, maxLength: 4096)
        guard case .data(let host) = status.mapping else {
            Issue.record("expected data at guest 0, got \(status.mapping)")
            return
        }
        #expect(try image.refcount(ofHostOffset: host) == 1)
        // Far past the end of the file nothing is allocated.
        #expect(try image.refcount(ofHostOffset: 1 << 40) == 0)
        // Allocate and free through the public API; QEMU still sees a clean image.
        let fresh = try image.allocateClusters(3)
        #expect(try image.refcount(ofHostOffset: fresh + 8192) == 1)
        try image.freeClusters(at: fresh, count: 3)
        #expect(try image.refcount(ofHostOffset: fresh) == 0)
        try image.flush()
        image.close()
        try Tools.qemuImg("check", "-f", "qcow2", path)
    }

    /// Growing past one refcount table cluster moves the table; QEMU agrees with the result.
    @Test func growsTheRefcountTable() throws {
        let dir = TempDir()
        var options = QCowCreateOptions(size: 64 << 20)
        options.clusterSize = 512
        options.refcountBits = 64
        let path = dir.file("grow.qcow2")
        let image = try QCowCreator.create(at: path, options: options)
        let before = image.header.refcountTableOffset
        // 64-bit refcounts, 512-byte clusters: one block covers 32 KiB, one table cluster 2 MiB.
        let data = [UInt8](repeating: 0x42, count: 3 << 20)
        try data.withUnsafeBytes { try image.write($0, at: 1 << 20) }
        #expect(image.header.refcountTableOffset != before)
        #expect(image.header.refcountTableClusters > 1)
        try image.flush()
        image.close()
        try Tools.qemuImg("check", "-f", "qcow2", path)
        try Tools.qemuImg("compare", "-q", "-f", "qcow2", path, path)
        let reopened = try ImageOpener.open(path)
        defer { reopened.close() }
        var back = [UInt8](repeating: 0, count: data.count)
        try back.withUnsafeMutableBytes { try reopened.read(into: $0, at: 1 << 20) }
        #expect(back == data)
    }
}
