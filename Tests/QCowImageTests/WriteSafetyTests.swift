import Foundation
import QCowImage
import Testing
import TestSupport

/// What the write engine refuses: metadata overwrites (the corrupt bit is set,
/// as QEMU does), dirty and corrupt images, read-only images; and what it keeps:
/// unknown header extensions, with unknown autoclear bits cleared.
@Suite struct WriteSafetyTests {
    /// An image with one data cluster at guest 0; returns the file offset of its L2 entry.
    func imageWithData(_ path: String) throws -> (l2Entry: UInt64, l1Offset: UInt64) {
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", path, "4M")
        try Tools.qemuIO(path, format: "qcow2", ["write -P 0x11 0 64k"])
        let image = try #require(try ImageOpener.open(path) as? QCowFile)
        defer { image.close() }
        let l2 = L1Entry(rawValue: image.l1[0]).l2Offset
        return (l2, image.header.l1TableOffset)
    }

    @Test func writeOntoMetadataMarksTheImageCorrupt() throws {
        let dir = TempDir()
        let path = dir.file("bad.qcow2")
        let (l2, l1Offset) = try imageWithData(path)
        // Point guest cluster 0 at the L1 table (COPIED set: an in-place write would hit it).
        try poke(path, at: l2, be(L2Entry.data(host: l1Offset).rawValue))
        let l1Before = try peek(path, at: l1Offset, count: 64)
        let image = try #require(try openWritableRetryingLock(path) as? QCowFile)
        let data = [UInt8](repeating: 0x99, count: 512)
        let error = try #require(throws: QCowError.self) { try data.withUnsafeBytes { try image.write($0, at: 0) } }
        #expect(error.code == .corrupt)
        #expect(image.header.incompatibleFeatures.contains(.corrupt))
        // Later writes are refused too.
        #expect(throws: QCowError.self) { try data.withUnsafeBytes { try image.write($0, at: 1 << 20) } }
        image.close()
        #expect(try peek(path, at: l1Offset, count: 64) == l1Before, "the L1 table was overwritten")
        let info = try Tools.run("qemu-img", ["info", "--output=json", path])
        #expect(info.stdout.contains("\"corrupt\": true"))
        // A corrupt image is not opened for writing again.
        let reopen = try #require(throws: QCowError.self) { try ImageOpener.open(path, writable: true) }
        #expect(reopen.code == .refused)
    }

    @Test func refusesADirtyImage() throws {
        let dir = TempDir()
        let path = dir.file("dirty.qcow2")
        _ = try imageWithData(path)
        try poke(path, at: 72, be(UInt64(1)))  // incompatible_features: dirty bit
        let error = try #require(throws: QCowError.self) { try ImageOpener.open(path, writable: true) }
        #expect(error.code == .refused)
        #expect(error.offset == 72)
    }

    @Test func refusesWritesToAReadOnlyImage() throws {
        let dir = TempDir()
        let path = dir.file("ro.qcow2")
        _ = try imageWithData(path)
        let image = try #require(try ImageOpener.open(path) as? QCowFile)
        defer { image.close() }
        let data = [UInt8](repeating: 1, count: 10)
        let error = try #require(throws: QCowError.self) { try data.withUnsafeBytes { try image.write($0, at: 0) } }
        #expect(error.code == .refused)
        #expect(throws: QCowError.self) { try image.discard(at: 0, length: 65536) }
        #expect(throws: QCowError.self) { _ = try image.allocateClusters(1) }
    }

    @Test func rejectsRangesPastTheEnd() throws {
        let image = try QCowCreator.create(on: MemoryDevice(), options: QCowCreateOptions(size: 1 << 20))
        let data = [UInt8](repeating: 1, count: 10)
        let error = try #require(throws: QCowError.self) { try data.withUnsafeBytes { try image.write($0, at: (1 << 20) - 5) } }
        #expect(error.code == .invalidArgument)
        #expect(throws: QCowError.self) { try image.writeZeroes(at: 1 << 20, length: 1) }
        #expect(throws: QCowError.self) { try data.withUnsafeBytes { try image.writeCompressed(cluster: $0, at: 0) } }
    }

    @Test func keepsUnknownExtensionsAndClearsUnknownAutoclearBits() throws {
        let dir = TempDir()
        let path = dir.file("ext.qcow2")
        let image = try QCowCreator.create(at: path, options: QCowCreateOptions(size: 1 << 20))
        try image.rewriteHeader { h in
            h.setExtension(0x1234_5678, [1, 2, 3, 4, 5])
            h.autoclearFeatures.insert(AutoclearFeatures(rawValue: 1 << 40))
            h.compatibleFeatures.insert(CompatibleFeatures(rawValue: 1 << 9))
        }
        #expect(image.header.autoclearFeatures.rawValue & (1 << 40) == 0)
        image.close()
        // Set an unknown autoclear bit behind our back: the first write clears it, and nothing
        // else; opening for write alone changes nothing (a refused damaged image stays byte-identical).
        var autoclear = try peek(path, at: 88, count: 8)
        autoclear[2] |= 0x80
        try poke(path, at: 88, autoclear)
        let before = try Data.contents(of: path)
        let reopened = try #require(try openWritableRetryingLock(path) as? QCowFile)
        #expect(try Data.contents(of: path) == before)
        try [UInt8](repeating: 7, count: 512).withUnsafeBytes { try reopened.write($0, at: 0) }
        #expect(reopened.header.autoclearFeatures.rawValue == 0)
        #expect(try peek(path, at: 88, count: 8) == [UInt8](repeating: 0, count: 8))
        #expect(reopened.header.extensionData(0x1234_5678) == [1, 2, 3, 4, 5])
        #expect(reopened.header.compatibleFeatures.rawValue & (1 << 9) != 0)
        reopened.close()
        try Tools.qemuImg("check", "-f", "qcow2", path)
    }
}

/// Growing the virtual size, with and without a bigger L1 table.
@Suite struct ResizeTests {
    @Test(arguments: [(65536, UInt64(100) << 20), (512, UInt64(3) << 20)])
    func growsAndStaysClean(clusterSize: Int, newSize: UInt64) throws {
        let dir = TempDir()
        let path = dir.file("grow.qcow2")
        var options = QCowCreateOptions(size: 1 << 20)
        options.clusterSize = clusterSize
        let image = try QCowCreator.create(at: path, options: options)
        let head = [UInt8](repeating: 0x31, count: 5000)
        try head.withUnsafeBytes { try image.write($0, at: 1000) }
        try image.grow(to: newSize)
        #expect(image.virtualSize == newSize)
        let tail = [UInt8](repeating: 0x32, count: 7000)
        try tail.withUnsafeBytes { try image.write($0, at: newSize - 7000) }
        #expect(throws: QCowError.self) { try image.grow(to: 512) }
        try image.flush()
        image.close()
        try Tools.qemuImg("check", "-f", "qcow2", path)
        let verify = try Tools.qemuIO(path, format: "qcow2", ["read -P 0x31 1000 5000", "read -P 0x32 \(newSize - 7000) 7000",
                                                              "read -P 0 \(1 << 20) 4096"])
        #expect(!verify.stdout.contains("fail"), "\(verify.stdout)")
        let info = try JSONSerialization.jsonObject(with: Tools.qemuImg("info", "--output=json", path).stdoutData) as? [String: Any]
        #expect(info?["virtual-size"] as? UInt64 == newSize)
    }
}
