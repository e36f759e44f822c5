import Foundation
import QCowImage
import Testing
import TestSupport

/// Images we create pass `qemu-img check`, and `qemu-img info` reports the options we asked for.
@Suite struct QCowCreatorTests {
    struct Case: CustomTestStringConvertible, Sendable {
        var options: QCowCreateOptions
        var testDescription: String {
            "v\(options.version) \(options.clusterSize)B rc\(options.refcountBits)\(options.extendedL2 ? " extl2" : "") \(options.compression.name) \(options.size)"
        }
    }

    static let cases: [Case] = {
        var out: [Case] = []
        for cs in [512, 4096, 65536, 2 << 20] {
            for bits in [1, 2, 4, 8, 16, 32, 64] {
                var o = QCowCreateOptions(size: 64 << 20)
                o.clusterSize = cs
                o.refcountBits = bits
                o.extendedL2 = cs >= 16384 && bits == 16
                o.compression = bits == 8 ? .zstd : .zlib
                out.append(Case(options: o))
            }
        }
        var big = QCowCreateOptions(size: 4 << 30)  // L1 spanning several clusters at 512 B
        big.clusterSize = 512
        big.refcountBits = 64
        out.append(Case(options: big))
        var v2 = QCowCreateOptions(size: 10 << 20)
        v2.version = 2
        out.append(Case(options: v2))
        var empty = QCowCreateOptions(size: 0)
        empty.clusterSize = 4096
        out.append(Case(options: empty))
        return out
    }()

    @Test(arguments: cases)
    func createdImageIsCleanAndDescribed(_ c: Case) throws {
        let dir = TempDir()
        let path = dir.file("new.qcow2")
        let image = try QCowCreator.create(at: path, options: c.options)
        image.close()
        try Tools.qemuImg("check", "-f", "qcow2", path)
        let info = try JSONSerialization.jsonObject(with: Tools.qemuImg("info", "--output=json", "-f", "qcow2", path).stdoutData)
            as? [String: Any]
        #expect(info?["virtual-size"] as? UInt64 == c.options.size)
        #expect(info?["cluster-size"] as? Int == c.options.clusterSize)
        let data = (info?["format-specific"] as? [String: Any])?["data"] as? [String: Any]
        if c.options.version == 3 {
            #expect(data?["compat"] as? String == "1.1")
            #expect(data?["refcount-bits"] as? Int == c.options.refcountBits)
            #expect(data?["extended-l2"] as? Bool == c.options.extendedL2)
            #expect(data?["compression-type"] as? String == c.options.compression.name)
        } else {
            #expect(data?["compat"] as? String == "0.10")
        }
        // The image reads back as zeros through our reader.
        let reopened = try ImageOpener.open(path)
        defer { reopened.close() }
        #expect(reopened.virtualSize == c.options.size)
    }

    @Test func backingFileAndFormatAreRecorded() throws {
        let dir = TempDir()
        try Tools.qemuImg("create", "-q", "-f", "raw", dir.file("base.raw"), "1M")
        var o = QCowCreateOptions(size: 2 << 20)
        o.backingFile = "base.raw"
        o.backingFormat = .raw
        try QCowCreator.create(at: dir.file("top.qcow2"), options: o).close()
        try Tools.qemuImg("check", dir.file("top.qcow2"))
        let info = try JSONSerialization.jsonObject(with: Tools.qemuImg("info", "--output=json", dir.file("top.qcow2")).stdoutData)
            as? [String: Any]
        #expect(info?["backing-filename"] as? String == "base.raw")
        #expect(info?["backing-filename-format"] as? String == "raw")
        let opened = try ImageOpener.open(dir.file("top.qcow2"))
        defer { opened.close() }
        #expect(opened.chain.count == 2)
    }

    @Test func rawImageHasTheSize() throws {
        let dir = TempDir()
        try QCowCreator.createRaw(at: dir.file("a.raw"), size: 3 << 20)
        let info = try JSONSerialization.jsonObject(with: Tools.qemuImg("info", "--output=json", dir.file("a.raw")).stdoutData)
            as? [String: Any]
        #expect(info?["virtual-size"] as? Int == 3 << 20)
        #expect(info?["format"] as? String == "raw")
    }

    @Test func refusesWhatQemuRefuses() throws {
        var o = QCowCreateOptions(size: 1 << 20)
        o.clusterSize = 1000
        #expect(throws: QCowError.self) { try QCowCreator.validate(o) }
        o.clusterSize = 4096
        o.extendedL2 = true
        #expect(throws: QCowError.self) { try QCowCreator.validate(o) }
        o.extendedL2 = false
        o.version = 2
        o.refcountBits = 8
        #expect(throws: QCowError.self) { try QCowCreator.validate(o) }
        o = QCowCreateOptions(size: 1000)
        #expect(throws: QCowError.self) { try QCowCreator.validate(o) }
    }
}
