@testable import BackupChain
import Foundation
import QCowImage
import Testing
import TestSupport

/// The layer's digest is hashed behind the copy: it must still be that of the final file
/// when chunks the thread already hashed are written again (the write-back's metadata, a
/// rewrite in place, a resize).
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
        let deadline = Date().addingTimeInterval(20)
        while hasher.hashedNow < 4 && Date() < deadline { usleep(10_000) }
        #expect(hasher.hashedNow >= 4, "the thread hashed \(hasher.hashedNow) chunks behind the writes")
        // Rewrite data in place inside chunks the thread hashed, and grow the file.
        fill(2)
        try data.withUnsafeBytes { try layer.write(UnsafeRawBufferPointer(rebasing: $0[0..<65536]), at: 1 << 20) }
        try data.withUnsafeBytes { try layer.write(UnsafeRawBufferPointer(rebasing: $0[0..<65536]), at: 5 << 20) }
        try data.withUnsafeBytes { try layer.write($0, at: 50 << 20) }
        try layer.writeBack()
        let (digest, identity) = try hasher.finish { try layer.flush() }
        let (whole, wholeIdentity) = try LayerDigest.compute(path: path)
        #expect(digest == whole)
        #expect(identity == wholeIdentity)
        #expect(hasher.hashedBehind >= 2, "chunks still valid from the thread: \(hasher.hashedBehind)")
        #expect(hasher.hashedAtEnd < whole.chunks.count, "finish hashed \(hasher.hashedAtEnd) of \(whole.chunks.count)")
        #expect(layer.device is FileDevice && (layer.device as? FileDevice)?.writeLog == nil)
    }
}
