@testable import BackupChain
import Foundation
import QCowImage
import Testing
import TestSupport

/// The layer's digest is hashed from the copy's writes as they go: it must still be that of
/// the final file when chunks already digested are written again (the write-back's
/// metadata, a rewrite in place, a resize) or are written out of order.
@Suite struct LayerHasherTests {
    @Test func digestIsThatOfTheFinalFileAfterRewritesBehindTheHasher() throws {
        let dir = TempDir("qbackup-layer-hasher")
        let path = dir.file("layer.qcow2")
        let layer = try QCowCreator.create(at: path, options: QCowCreateOptions(size: 64 << 20))
        defer { layer.close() }
        layer.syncBarriers = false
        let hasher = try LayerHasher(layer)
        var rng = SeededRandom(seed: 14)
        var data = [UInt8](repeating: 0, count: 1 << 20)
        data.withUnsafeMutableBytes { raw in
            for i in 0..<(raw.count / 8) { raw.storeBytes(of: rng.next() | 1, toByteOffset: i * 8, as: UInt64.self) }
        }
        // Each MiB written differs from the others in its first word.
        var stamp: UInt64 = 0
        func fill(_ value: UInt8) {
            stamp += 1
            data.withUnsafeMutableBytes { $0.storeBytes(of: stamp << 8 | UInt64(value), as: UInt64.self) }
        }
        // 40 MiB of data: the file grows past the hasher's margin, so it hashes the first chunks.
        for mib in 0..<40 {
            fill(1)
            try data.withUnsafeBytes { try layer.write($0, at: UInt64(mib) << 20) }
        }
        #expect(hasher.hashedNow >= 8, "\(hasher.hashedNow) chunks digested from the writes")
        // Rewrite data in place inside chunks already digested, and grow the file.
        fill(2)
        try data.withUnsafeBytes { try layer.write(UnsafeRawBufferPointer(rebasing: $0[0..<65536]), at: 1 << 20) }
        try data.withUnsafeBytes { try layer.write(UnsafeRawBufferPointer(rebasing: $0[0..<65536]), at: 5 << 20) }
        try data.withUnsafeBytes { try layer.write($0, at: 50 << 20) }
        try layer.writeBack()
        let (digest, identity) = try hasher.finish { try layer.flush() }
        let (whole, wholeIdentity) = try LayerDigest.compute(path: path)
        #expect(digest == whole)
        #expect(identity == wholeIdentity)
        #expect(hasher.hashedBehind >= 6, "chunks still digested from the writes: \(hasher.hashedBehind)")
        #expect(hasher.hashedAtEnd < whole.chunks.count / 2, "finish read \(hasher.hashedAtEnd) of \(whole.chunks.count)")
        #expect(layer.device is FileDevice && (layer.device as? FileDevice)?.writeLog == nil)
    }

    /// Seeded random writes to a plain file: appends of any length (which digest chunks
    /// front to back), rewrites in place, writes past the end and back, gaps filled later,
    /// shrinks and growths. Whatever the order, the digest is the file's.
    @Test(arguments: 0..<12) func digestIsThatOfTheFileWhateverTheOrderOfTheWrites(seed: Int) throws {
        let dir = TempDir("qbackup-layer-hasher-random")
        let path = dir.file("file")
        let device = try FileDevice(creating: path)
        defer { device.close() }
        var rng = SeededRandom(seed: UInt64(100 + seed))
        func below(_ n: Int) -> Int { Int(rng.next() % UInt64(n)) }
        let chunk = LayerHasher.chunk
        // Something in the file before the hasher starts (a new layer's header and tables).
        var head = [UInt8](repeating: 7, count: 200_000)
        try head.withUnsafeBytes { try device.write($0, at: 0) }
        let hasher = try LayerHasher(device: device)
        var data = [UInt8](repeating: 0, count: chunk + 65536)
        func scramble(_ n: Int) {
            for i in stride(from: 0, to: n, by: 512) where i + 8 <= n {
                data.withUnsafeMutableBytes { $0.storeBytes(of: rng.next(), toByteOffset: i, as: UInt64.self) }
            }
        }
        // First as the copier writes: front to back from a chunk's start, in pieces of any size.
        var end = UInt64(chunk)
        while end < UInt64(3 * chunk) {
            let n = [4096, 65536, 1 << 20, 3 << 20][below(4)]
            scramble(n)
            try data.withUnsafeBytes { try device.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: end) }
            end += UInt64(n)
        }
        #expect(hasher.hashedNow >= 1, "no chunk was digested from writes front to back")
        // Then anything.
        for _ in 0..<80 {
            let n = [1, 512, 4096, 65536, 1 << 20, chunk, chunk + 65536][below(7)]
            scramble(n)
            let at: UInt64
            switch below(10) {
            case 0..<5: at = end                                          // append
            case 5: at = UInt64(below(Int(end) + 1))                      // anywhere, rewrites too
            case 6: at = UInt64(below(Int(end / UInt64(chunk)) + 2)) * UInt64(chunk)  // a chunk's start
            case 7: at = end + UInt64(below(chunk))                       // past the end: a gap
            case 8:
                head.withUnsafeMutableBytes { $0.storeBytes(of: rng.next(), as: UInt64.self) }
                try head.withUnsafeBytes { try device.write(UnsafeRawBufferPointer(rebasing: $0[0..<512]), at: 0) }
                continue
            default:
                let size = below(2) == 0 ? UInt64(below(Int(end) + 1)) : end + UInt64(below(chunk))
                try device.resize(to: size)
                end = size
                continue
            }
            try data.withUnsafeBytes { try device.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: at) }
            end = max(end, at + UInt64(n))
        }
        let (digest, identity) = try hasher.finish { try device.sync() }
        let (whole, wholeIdentity) = try LayerDigest.compute(path: path)
        #expect(digest == whole)
        #expect(identity == wholeIdentity)
    }

    /// A layer written front to back (as the copier writes a full backup) is digested from
    /// the writes: finish reads only the chunks the write-back changed and the tail.
    @Test func aLayerWrittenInOrderIsNotReadBack() throws {
        let dir = TempDir("qbackup-layer-hasher-order")
        let path = dir.file("layer.qcow2")
        let layer = try QCowCreator.create(at: path, options: QCowCreateOptions(size: 256 << 20))
        defer { layer.close() }
        layer.syncBarriers = false
        let hasher = try LayerHasher(layer)
        var rng = SeededRandom(seed: 15)
        var data = [UInt8](repeating: 0, count: 4 << 20)
        for mib in stride(from: 0, to: 200, by: 4) {
            data.withUnsafeMutableBytes { raw in
                for i in 0..<(raw.count / 8) { raw.storeBytes(of: rng.next() | 1, toByteOffset: i * 8, as: UInt64.self) }
            }
            try data.withUnsafeBytes { try layer.write($0, at: UInt64(mib) << 20) }
        }
        try layer.writeBack()
        let (digest, _) = try hasher.finish { try layer.flush() }
        let (whole, _) = try LayerDigest.compute(path: path)
        #expect(digest == whole)
        #expect(whole.chunks.count >= 50)
        #expect(hasher.hashedAtEnd <= 4, "finish read \(hasher.hashedAtEnd) of \(whole.chunks.count) chunks")
    }
}
