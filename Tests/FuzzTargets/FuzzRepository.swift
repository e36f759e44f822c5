import BackupChain
import Foundation
import QCowImage

extension FuzzTargets {
    /// The folder the unpacked files are placed in (in memory; nothing touches the file system).
    public static let repositoryFolder = "/fuzz-repository"
    /// Points opened and read per input, at most.
    static let maxPoints = 8

    /// A repository from bytes (see `unpackRepository`): `verify` of its layers, then every
    /// point opened as `restore` opens it and read. A verify that finds nothing wrong
    /// promises that every point opens.
    public static func repository(_ data: UnsafeRawBufferPointer) {
        guard let files = unpackRepository(data), let manifestBytes = files[BackupManifest.fileName],
              let manifest = try? BackupManifest(validating: Data(manifestBytes), path: "\(repositoryFolder)/manifest.json")
        else { return }
        let memory = repositoryFiles(files)
        var report = ChainVerifier.Report()
        ChainVerifier.verifyLayers(of: manifest, in: repositoryFolder, files: memory, report: &report)
        expect(report.layersChecked == manifest.layers.count, "verify skipped layers")
        for index in manifest.layers.indices.prefix(maxPoints) {
            let image: GuestImage
            do {
                image = try RestoreEngine.openPoint(repositoryFolder, manifest, index: index, files: memory)
            } catch {
                expect(!report.ok, "verify passed but point \(index) does not open: \(error)")
                continue
            }
            readAllocated(image)
            image.close()
        }
    }

    /// The unpacked files but the manifest, as the repository folder's files, in memory.
    public static func repositoryFiles(_ files: [String: [UInt8]]) -> MemoryFiles {
        let memory = MemoryFiles()
        for (name, bytes) in files where name != BackupManifest.fileName { memory.add("\(repositoryFolder)/\(name)", bytes) }
        return memory
    }

    /// Unpacks records of (u16 name length, name, u32 length, bytes), big-endian, to
    /// files by name; nil when the bytes are not such records. `scripts/fuzz-corpus.sh`
    /// packs real repositories this way for the seeds.
    public static func unpackRepository(_ data: UnsafeRawBufferPointer) -> [String: [UInt8]]? {
        var files: [String: [UInt8]] = [:]
        var at = 0
        func take(_ n: Int) -> UnsafeRawBufferPointer? {
            guard n <= data.count - at else { return nil }
            defer { at += n }
            return UnsafeRawBufferPointer(rebasing: data[at..<at + n])
        }
        func number(_ width: Int) -> Int? {
            take(width).map { $0.reduce(0) { $0 << 8 | Int($1) } }
        }
        while at < data.count {
            guard let nameLength = number(2), let name = take(nameLength), let length = number(4),
                  let bytes = take(length) else { return nil }
            let text = String(decoding: name, as: UTF8.self)
            guard !text.isEmpty, !text.contains("/") else { return nil }
            files[text] = Array(bytes)
        }
        return files
    }
}
