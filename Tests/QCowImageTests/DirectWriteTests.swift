import Foundation
@testable import QCowImage
import Testing
import TestSupport

/// A new layer's whole data clusters go past the page cache (O_DIRECT); everything else stays
/// buffered, on the same file, and what reads back is what was written, in the order written.
@Suite struct DirectWriteTests {
    @Test func alignedWritesGoDirectAndMixWithBufferedOnes() throws {
        let dir = TempDir("qbackup-direct-write")
        let path = dir.file("file")
        let device = try FileDevice(creating: path)
        defer { device.close() }
        #expect(device.writeDirectWhenAligned(), "O_DIRECT refused on \(dir.path)")
        let size = 1 << 20
        let aligned = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
        defer { aligned.deallocate() }
        var model = [UInt8](repeating: 0, count: 3 << 20)
        var rng = SeededRandom(seed: 31)
        func fill(_ buffer: UnsafeMutableRawBufferPointer) {
            for i in stride(from: 0, to: buffer.count, by: 8) { buffer.storeBytes(of: rng.next(), toByteOffset: i, as: UInt64.self) }
        }
        func write(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws {
            try device.write(bytes, at: UInt64(offset))
            model.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[offset..<(offset + bytes.count)]).copyMemory(from: bytes) }
        }
        // Direct: buffer, offset and length on 4 KiB.
        fill(aligned)
        try write(UnsafeRawBufferPointer(aligned), at: 0)
        #expect(device.directBytes == UInt64(size))
        // Buffered into the middle of what went direct, then direct over part of that again.
        var small = [UInt8](repeating: 0, count: 1000)
        small.withUnsafeMutableBytes { fill($0) }
        try small.withUnsafeBytes { try write($0, at: 5000) }
        fill(aligned)
        try write(UnsafeRawBufferPointer(rebasing: aligned[0..<8192]), at: 4096)
        // Unaligned offset or pointer: buffered.
        try write(UnsafeRawBufferPointer(rebasing: aligned[0..<8192]), at: (1 << 20) + 512)
        try write(UnsafeRawBufferPointer(rebasing: aligned[512..<(512 + 4096)]), at: 2 << 20)
        #expect(device.directBytes == UInt64(size + 8192))
        try device.sync()
        let back = try Data(contentsOf: URL(fileURLWithPath: path))
        #expect(back.count == (2 << 20) + 4096)
        #expect(Array(back) == Array(model[0..<back.count]))
    }
}
