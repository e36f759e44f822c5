import Logging
import QCowImage

/// Restores a point in time of a repository: the chain up to layer INDEX,
/// flattened into one standalone image. Never modifies the repository.
public enum RestoreEngine {
    public enum OutputFormat: String, Sendable, CaseIterable { case qcow2, raw }

    public struct Request: Sendable {
        public var repository: String
        public var output: String
        /// The point to restore (`--at`): by default the latest.
        public var point: PointSelector
        public var format: OutputFormat
        /// Also check each layer's checksum before reading (every byte of the chain is read twice).
        public var verify: Bool
        /// Replace an existing OUT (`--force`); without it an existing OUT is refused.
        public var force: Bool
        public init(repository: String, output: String, point: PointSelector = .latest, format: OutputFormat = .qcow2,
                    verify: Bool = false, force: Bool = false) {
            self.verify = verify
            self.force = force
            self.repository = repository
            self.output = output
            self.point = point
            self.format = format
        }
    }

    public struct Result: Sendable {
        public var index: Int
        public var layer: BackupManifest.Layer
        public var virtualSize: UInt64
        public var dataBytes: UInt64
    }

    /// Opens the chain of layer `index` of the repository in `directory`, checking that the
    /// files' backing links are what the manifest says. The files come from `files` (by default
    /// `RepositoryFiles`: regular files inside `directory`, never through a symbolic link).
    public static func openPoint(_ directory: String, _ manifest: BackupManifest, index: Int,
                                 files: FileOpener? = nil) throws -> GuestImage {
        func file(_ name: String) -> String { "\(directory)/\(name)" }
        let layerPath = file(manifest.layers[index].file)
        let image = try ImageOpener.open(layerPath, format: .qcow2, files: files ?? RepositoryFiles(directory: directory))
        let chain = image.chain
        let expectedDepth = index - manifest.segmentStart(of: index) + 1
        guard chain.count == expectedDepth else {
            image.close()
            throw ChainError(.corrupt, "layer \(index) has a backing chain of \(chain.count) files, the manifest says \(expectedDepth)",
                             path: layerPath)
        }
        for (depth, layer) in chain.enumerated() {
            let expected = file(manifest.layers[index - depth].file)
            guard layer.filename == expected else {
                image.close()
                throw ChainError(.corrupt, "backing chain of layer \(index) reaches \(layer.filename), the manifest says \(expected)",
                                 path: layerPath)
            }
        }
        return image
    }

    /// Before a point is read: each layer of its chain is a regular file inside the folder of
    /// the size the manifest recorded (`openPoint` then checks the backing links); with
    /// `digests`, each file's checksum matches too (`restore --verify`).
    static func checkChain(_ repo: BackupRepository, _ manifest: BackupManifest, index: Int, digests: Bool) throws {
        let files = RepositoryFiles(directory: repo.path)
        for i in manifest.segmentStart(of: index)...index {
            let layer = manifest.layers[i]
            let device = try files.openFile(repo.file(layer.file), writable: false)
            defer { device.close() }
            let size = try device.size()
            guard size == layer.fileSize else {
                throw ChainError(.corrupt, "layer \(layer.index) is \(size) bytes, the manifest says \(layer.fileSize) (truncated or replaced); run 'qbackup verify'",
                                 path: repo.file(layer.file))
            }
            if digests, let problem = try LayerDigest.problem(device, layer: layer) {
                throw ChainError(.corrupt, "layer \(layer.index) does not match its checksum in the manifest (\(problem): damaged or replaced); run 'qbackup verify'",
                                 path: repo.file(layer.file))
            }
        }
    }

    public static func restore(_ request: Request, logger: Logger = Logger(label: "qbackup.restore"),
                               progress: ((UInt64, UInt64) -> Void)? = nil) throws -> Result {
        let repo = try BackupRepository(path: request.repository, exclusive: false)
        guard let manifest = repo.manifest, !manifest.layers.isEmpty else {
            throw ChainError(.invalidArgument, "the repository holds no backup", path: request.repository)
        }
        if manifest.pendingMerge != nil {
            throw ChainError(.refused, "a merge was interrupted; run 'qbackup merge' or 'qbackup verify' to finish it first",
                             path: request.repository)
        }
        // An index is a point's stable index (as `list` shows it), not a position.
        let index = try request.point.position(in: manifest, repository: request.repository)
        // OUT is written under a temporary name and renamed only when complete; an existing
        // OUT (a symbolic link included) is refused before anything is read, unless forced.
        // `-` (stdout) and a block device are written in place, raw only.
        let output = try OutputFile.target(request.output, overwrite: request.force)
        if output.inPlace && request.format != .raw {
            output.discard()
            throw ChainError(.invalidArgument, "stdout and block devices take a raw restore: use --format raw", path: request.output)
        }
        try checkChain(repo, manifest, index: index, digests: request.verify)
        let image = try openPoint(repo.path, manifest, index: index)
        defer { image.close() }
        logger.debug("restoring", metadata: ["index": "\(manifest.layers[index].index)", "output": "\(request.output)"])
        let written: UInt64
        do {
            // The point in time as one standalone image, laid out as `flatten` lays it out.
            var options = FlattenOptions()
            options.format = request.format == .raw ? .raw : .qcow2
            options.clusterSize = manifest.clusterSize
            written = try ImageFlattener.flatten(image, into: output, options: options, logger: logger,
                                                 progress: progress).dataBytes
        } catch {
            // Only the temporary file goes: whatever was at OUT stays as it was.
            output.discard()
            throw error
        }
        return Result(index: manifest.layers[index].index, layer: manifest.layers[index], virtualSize: image.virtualSize, dataBytes: written)
    }
}
